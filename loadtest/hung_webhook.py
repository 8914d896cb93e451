#!/usr/bin/env python3
"""A webhook receiver that accepts every connection, reads the request and never
answers: the worst receiver for alert delivery. For the bench that shows such a
receiver costs the request path nothing (README, "Alerts (webhooks)"):

    python3 loadtest/hung_webhook.py --port 18999 &
    # add to the gateway config under test:
    #   alerts: { webhooks: [ { name: hung, url: "http://127.0.0.1:18999/hook" } ],
    #             budget_thresholds: [0.000001, 0.000002, 0.000003] }
    # (tiny thresholds of a tenant budget, so events are raised during the run), then
    # compare loadtest/bench.py's p99 with and without the alerts section.
"""

import argparse
import socket
import threading


def hold(conn: socket.socket) -> None:
    try:
        conn.recv(65536)
        threading.Event().wait()  # never answer; the gateway's 10 s timeout ends it
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=18999)
    a = ap.parse_args()
    srv = socket.create_server(("127.0.0.1", a.port), backlog=1024, reuse_port=False)
    print(f"hung webhook on http://127.0.0.1:{a.port}/hook", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=hold, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
