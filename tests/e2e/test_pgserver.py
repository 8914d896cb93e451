"""The private PostgreSQL of the tests (pgserver.py) does what the store tests rely on:
data survives a stop and a start on the same port, a paused server answers nothing (a
connection attempt times out) until resumed, and trust authentication is limited to
loopback with the socket in the server's own directory.
"""

from __future__ import annotations

import socket
import time

import pytest

from pgserver import PgError


def test_shared_server_serves_the_gateway_database(pg_server):
    assert pg_server.url == f"postgres://postgres@127.0.0.1:{pg_server.port}/gateway"
    assert pg_server.psql("SELECT current_database()") == "gateway"
    url = pg_server.create_database("pgserver_shared_check")
    assert url.endswith(f":{pg_server.port}/pgserver_shared_check")
    assert pg_server.psql("SELECT 40 + 2", database="pgserver_shared_check") == "42"
    # Listening on loopback only, its unix socket in its own directory.
    settings = pg_server.psql("SELECT current_setting('listen_addresses'), "
                              "current_setting('unix_socket_directories')")
    assert settings == f"127.0.0.1|{pg_server.sock_dir}"
    assert list(pg_server.sock_dir.glob(".s.PGSQL.*"))


def test_data_survives_stop_and_start_on_the_same_port(private_pg):
    pg = private_pg()
    port, url = pg.port, pg.url
    pg.psql("CREATE TABLE kept (id int PRIMARY KEY, name text); "
            "INSERT INTO kept VALUES (1, 'one'), (2, 'two')")
    pid = pg.pid
    pg.stop()
    assert pg.pid is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(PgError):
        pg.psql("SELECT 1", timeout=3)

    pg.start()
    assert (pg.port, pg.url) == (port, url)
    assert pg.pid != pid
    assert pg.psql("SELECT name FROM kept ORDER BY id") == "one\ntwo"


def test_a_paused_server_answers_nothing_until_resumed(private_pg):
    pg = private_pg()
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    pg.pause()
    t0 = time.monotonic()
    with pytest.raises(PgError, match="no answer"):
        pg.psql("SELECT x FROM t", timeout=2)
    assert time.monotonic() - t0 < 6
    # The kernel still accepts the TCP connection: a stalled server, not a dead one.
    socket.create_connection(("127.0.0.1", pg.port), timeout=1).close()
    pg.resume()
    assert pg.psql("SELECT x FROM t") == "7"
    # Stopping a paused server works too (it is resumed first).
    pg.pause()
    pg.stop()
    pg.start()
    assert pg.psql("SELECT x FROM t") == "7"


def test_sql_errors_raise(pg_server):
    with pytest.raises(PgError, match="no_such_table"):
        pg_server.psql("SELECT * FROM no_such_table")
