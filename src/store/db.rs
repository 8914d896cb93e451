//! The two databases behind the key store, one small SQL surface over both.
//!
//! Every statement is written once, with `$1`-style parameters, in the subset SQLite
//! (bundled, 3.4x) and PostgreSQL both run; values cross as [`Val`]. Schema changes
//! are versioned migrations applied at start, in one transaction each, recorded in
//! `gw_schema`, so nodes of different versions agree on what the schema is.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A column value: the store only has integers and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Int(i64),
    Text(String),
    /// NULL in an integer column.
    NullInt,
    /// NULL in a text column.
    NullText,
}

impl Val {
    pub fn int(&self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn opt_text(v: Option<&str>) -> Val {
        v.map_or(Val::NullText, |s| Val::Text(s.to_string()))
    }

    pub fn opt_int(v: Option<i64>) -> Val {
        v.map_or(Val::NullInt, Val::Int)
    }
}

pub type Row = Vec<Val>;

/// Why a database call failed; all of it is "the store is unavailable" to a client.
#[derive(Debug, Clone)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError(format!("sqlite: {e}"))
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The driver's Display is terse ("db error"): the server's message says why.
        match e.as_db_error() {
            Some(db) => DbError(format!("postgres: {}", db.message())),
            None => DbError(format!("postgres: {e}")),
        }
    }
}

/// The schema's versions, in order; `{SEQ}` is the one thing the two databases spell
/// differently (an auto-increment key).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE gw_meta (id INTEGER PRIMARY KEY, version BIGINT NOT NULL);
INSERT INTO gw_meta (id, version) VALUES (1, 0);
CREATE TABLE gw_tenants (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, disabled BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, version BIGINT NOT NULL);
CREATE INDEX gw_tenants_version ON gw_tenants (version);
CREATE TABLE gw_keys (
    tenant TEXT NOT NULL, id TEXT NOT NULL, spec TEXT NOT NULL,
    created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, revoked_ms BIGINT,
    version BIGINT NOT NULL, PRIMARY KEY (tenant, id));
CREATE INDEX gw_keys_version ON gw_keys (version);
CREATE TABLE gw_changes (
    seq {SEQ}, at_ms BIGINT NOT NULL, action TEXT NOT NULL,
    tenant TEXT NOT NULL, key_id TEXT, actor TEXT, fields TEXT NOT NULL);
CREATE INDEX gw_changes_at ON gw_changes (at_ms);
"#];

/// The channel of `NOTIFY`s that tell other nodes to look for changes.
pub const CHANNEL: &str = "llm_gateway_store";

/// Where the store lives; cheap to clone. Opening a connection is per use for
/// Postgres (admin writes are rare next to requests, and a fresh connection per write
/// cannot be left wedged by a stalled server); SQLite keeps one connection.
///
/// SQLite statements run on the calling thread: the file is local, a statement takes
/// microseconds to a few milliseconds, and only the admin listener and the store's
/// background task ever call them, never a proxy worker.
#[derive(Clone)]
pub enum Db {
    Sqlite(Arc<SqliteDb>),
    Postgres(Arc<PgTarget>),
}

pub struct SqliteDb {
    conn: Mutex<rusqlite::Connection>,
    /// One unit of work (transaction) at a time on the one connection.
    unit: Arc<tokio::sync::Mutex<()>>,
}

pub struct PgTarget {
    pub config: tokio_postgres::Config,
    /// One idle connection kept for the next unit of work: a node reads after every
    /// change anywhere, and a new Postgres connection (a server process forked,
    /// authenticated) costs tens of milliseconds of that delay.
    idle: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it carries the password.
        f.write_str(match self {
            Db::Sqlite(_) => "Db::Sqlite",
            Db::Postgres(_) => "Db::Postgres",
        })
    }
}

impl Db {
    pub fn sqlite(path: &Path) -> Result<Db, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| DbError(format!("creating {}: {e}", dir.display())))?;
        }
        let conn = rusqlite::Connection::open(path)?;
        // WAL: the CLI (import-tenants) and a running gateway may share the file; a
        // writer does not block the gateway's reads. busy_timeout bounds a wait on
        // the other's write lock.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_millis(2_000))?;
        Ok(Db::Sqlite(Arc::new(SqliteDb {
            conn: Mutex::new(conn),
            unit: Arc::new(tokio::sync::Mutex::new(())),
        })))
    }

    pub fn postgres(url: &str, connect_timeout: Duration) -> Result<Db, DbError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| DbError(format!("store url: {e}")))?;
        config.connect_timeout(connect_timeout);
        config.application_name("llm-gateway");
        Ok(Db::Postgres(Arc::new(PgTarget {
            config,
            idle: Mutex::new(None),
        })))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// A connection for one unit of work (a read or a write transaction).
    pub async fn connect(&self) -> Result<Conn, DbError> {
        match self {
            Db::Sqlite(db) => {
                let guard = db.unit.clone().lock_owned().await;
                Ok(Conn::Sqlite(db.clone(), guard))
            }
            Db::Postgres(t) => {
                let idle = match t.idle.lock() {
                    Ok(mut g) => g.take(),
                    Err(p) => p.into_inner().take(),
                };
                if let Some(client) = idle.filter(|c| !c.is_closed()) {
                    return Ok(Conn::Pg(client));
                }
                let (client, connection) = t.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(Conn::Pg(client))
            }
        }
    }

    /// Hands back a connection whose unit of work ended cleanly (committed or rolled
    /// back), for the next one. A connection from a failed or timed-out unit is
    /// dropped instead, never reused.
    pub fn release(&self, conn: Conn) {
        if let (Db::Postgres(t), Conn::Pg(client)) = (self, conn) {
            if !client.is_closed() {
                match t.idle.lock() {
                    Ok(mut g) => *g = Some(client),
                    Err(p) => *p.into_inner() = Some(client),
                }
            }
        }
    }

    /// Applies the migrations this binary knows and the database has not seen.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let seq = match self {
            Db::Sqlite(_) => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Db::Postgres(_) => "BIGSERIAL PRIMARY KEY",
        };
        let mut conn = self.connect().await?;
        // One transaction for the lot, under a lock every node takes first: nodes
        // starting together would otherwise race even `CREATE TABLE IF NOT EXISTS`
        // (Postgres answers the loser "type already exists"). SQLite's immediate
        // transaction is that lock already.
        conn.begin().await?;
        let r = async {
            if let Conn::Pg(_) = &conn {
                conn.exec("SELECT pg_advisory_xact_lock(7406361)", &[])
                    .await?;
            }
            conn.batch("CREATE TABLE IF NOT EXISTS gw_schema (version BIGINT NOT NULL)")
                .await?;
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                let done = conn
                    .query(
                        "SELECT version FROM gw_schema WHERE version = $1",
                        &[Val::Int(version)],
                    )
                    .await?;
                if done.is_empty() {
                    conn.batch(&sql.replace("{SEQ}", seq)).await?;
                    conn.exec(
                        "INSERT INTO gw_schema (version) VALUES ($1)",
                        &[Val::Int(version)],
                    )
                    .await?;
                    log::info!("store: applied schema migration {version}");
                }
            }
            Ok::<(), DbError>(())
        }
        .await;
        match r {
            Ok(()) => conn.commit().await?,
            Err(e) => {
                conn.rollback().await;
                return Err(e);
            }
        }
        Ok(())
    }
}

/// One connection, with the few operations the store uses.
pub enum Conn {
    Sqlite(Arc<SqliteDb>, tokio::sync::OwnedMutexGuard<()>),
    Pg(tokio_postgres::Client),
}

fn sqlite_sql(sql: &str) -> String {
    // `$1` is a named parameter to SQLite; `?1` is the positional one.
    sql.replace('$', "?")
}

fn lock(db: &SqliteDb) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
    match db.conn.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Conn {
    pub async fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c, _) => Ok(lock(c).execute_batch(sql)?),
            Conn::Pg(c) => Ok(c.batch_execute(sql).await?),
        }
    }

    pub async fn begin(&mut self) -> Result<(), DbError> {
        match self {
            // IMMEDIATE: take the write lock now, so the version bump cannot race.
            Conn::Sqlite(..) => self.batch("BEGIN IMMEDIATE").await,
            Conn::Pg(_) => self.batch("BEGIN").await,
        }
    }

    /// A read-only transaction that sees one consistent state (Postgres: one snapshot
    /// for the version and the rows at or below it).
    pub async fn begin_read(&mut self) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(..) => self.batch("BEGIN").await,
            Conn::Pg(_) => {
                self.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
            }
        }
    }

    pub async fn commit(&mut self) -> Result<(), DbError> {
        self.batch("COMMIT").await
    }

    pub async fn rollback(&mut self) {
        let _ = self.batch("ROLLBACK").await;
    }

    pub async fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, DbError> {
        match self {
            Conn::Sqlite(c, _) => {
                let c = lock(c);
                let mut stmt = c.prepare_cached(&sqlite_sql(sql))?;
                let n = stmt.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                Ok(n as u64)
            }
            Conn::Pg(c) => {
                let owned = pg_params(params);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    owned.iter().map(|p| p.as_ref() as _).collect();
                Ok(c.execute(sql, &refs).await?)
            }
        }
    }

    /// Calls `f` on each row as it is read, so a load of the whole store never holds
    /// every row twice (as rows and as records).
    pub async fn for_each(
        &mut self,
        sql: &str,
        params: &[Val],
        mut f: impl FnMut(&[Val]) + Send,
    ) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c, _) => {
                let c = lock(c);
                let mut stmt = c.prepare_cached(&sqlite_sql(sql))?;
                let cols = stmt.column_count();
                let mut rows =
                    stmt.query(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                let mut row = Vec::with_capacity(cols);
                while let Some(r) = rows.next()? {
                    row.clear();
                    for i in 0..cols {
                        row.push(sqlite_val(r.get_ref(i)?));
                    }
                    f(&row);
                }
                Ok(())
            }
            Conn::Pg(c) => {
                use futures_util::StreamExt;
                let owned = pg_params(params);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    owned.iter().map(|p| p.as_ref() as _).collect();
                let stream = c.query_raw(sql, refs).await?;
                futures_util::pin_mut!(stream);
                while let Some(r) = stream.next().await {
                    f(&pg_row(&r?)?);
                }
                Ok(())
            }
        }
    }

    pub async fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, DbError> {
        match self {
            Conn::Sqlite(c, _) => {
                let c = lock(c);
                let mut stmt = c.prepare_cached(&sqlite_sql(sql))?;
                let cols = stmt.column_count();
                let mut rows =
                    stmt.query(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(cols);
                    for i in 0..cols {
                        row.push(sqlite_val(r.get_ref(i)?));
                    }
                    out.push(row);
                }
                Ok(out)
            }
            Conn::Pg(c) => {
                let owned = pg_params(params);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    owned.iter().map(|p| p.as_ref() as _).collect();
                let rows = c.query(sql, &refs).await?;
                rows.iter().map(pg_row).collect()
            }
        }
    }
}

fn sqlite_val(v: rusqlite::types::ValueRef<'_>) -> Val {
    match v {
        rusqlite::types::ValueRef::Integer(n) => Val::Int(n),
        rusqlite::types::ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        rusqlite::types::ValueRef::Null => Val::NullText,
        other => Val::Text(format!("{other:?}")),
    }
}

/// Integers and text are all the schema has; `void` and the like read as NULL text.
fn pg_row(r: &tokio_postgres::Row) -> Result<Row, DbError> {
    use tokio_postgres::types::Type;
    let mut row = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let t = col.type_();
        row.push(if *t == Type::INT8 {
            Val::opt_int(r.try_get(i)?)
        } else if *t == Type::INT4 {
            Val::opt_int(r.try_get::<_, Option<i32>>(i)?.map(i64::from))
        } else if *t == Type::TEXT || *t == Type::VARCHAR {
            r.try_get::<_, Option<String>>(i)?
                .map_or(Val::NullText, Val::Text)
        } else {
            Val::NullText
        });
    }
    Ok(row)
}

fn to_sqlite(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::Int(i) => rusqlite::types::Value::Integer(*i),
        Val::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Val::NullInt | Val::NullText => rusqlite::types::Value::Null,
    }
}

fn pg_params(params: &[Val]) -> Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
    params
        .iter()
        .map(|v| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
            match v {
                Val::Int(i) => Box::new(*i),
                Val::Text(s) => Box::new(s.clone()),
                Val::NullInt => Box::new(None::<i64>),
                Val::NullText => Box::new(None::<String>),
            }
        })
        .collect()
}
