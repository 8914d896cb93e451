//! The ClickHouse side of the audit log: table creation, batched inserts (RowBinary
//! over HTTP with the official `clickhouse` crate) and the admin audit query.
//!
//! Everything here must work on ClickHouse 18.16 (what Debian ships) as well as on
//! current servers: no schema validation (it needs `RowBinaryWithNamesAndTypes`,
//! unknown to 18.16), no LZ4, no `LowCardinality`/`DateTime64` in the table the
//! gateway creates (`conf/clickhouse/schema.sql` is the recommended DDL for current
//! servers, wire-compatible with these rows). Every call is bounded in time, so a
//! server that accepts connections and never answers holds up only the shipper.

use super::AuditRow;
use crate::config::ClickHouseConf;
use std::time::Duration;

/// Longest an insert (send and acknowledgement) may take before it counts as failed.
pub const INSERT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the admin audit query waits before answering from the spool instead.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The row as ClickHouse's RowBinary wants it: `ts` is a `DateTime` (seconds).
#[derive(clickhouse::Row, serde::Serialize)]
struct ChRow<'a> {
    request_id: &'a str,
    ts: u32,
    ts_ms: u64,
    tenant: &'a str,
    api_key_id: &'a str,
    endpoint: &'a str,
    model_requested: &'a str,
    model: &'a str,
    provider: &'a str,
    region: &'a str,
    stream: u8,
    status: u16,
    error_code: &'a str,
    tokens_in: u32,
    tokens_out: u32,
    cached_tokens_in: u32,
    usage_estimated: u8,
    cost_nanousd: u64,
    latency_ms: u32,
    ttft_ms: u32,
    cache_hit: u8,
    fallback_used: u8,
    attempts: u8,
    node: &'a str,
    end_user: &'a str,
    upstream_model: &'a str,
}

impl<'a> From<&'a AuditRow> for ChRow<'a> {
    fn from(r: &'a AuditRow) -> Self {
        ChRow {
            request_id: &r.request_id,
            ts: (r.ts_ms / 1000).min(u32::MAX as u64) as u32,
            ts_ms: r.ts_ms,
            tenant: &r.tenant,
            api_key_id: &r.api_key_id,
            endpoint: &r.endpoint,
            model_requested: &r.model_requested,
            model: &r.model,
            provider: &r.provider,
            region: &r.region,
            stream: r.stream,
            status: r.status,
            error_code: &r.error_code,
            tokens_in: r.tokens_in,
            tokens_out: r.tokens_out,
            cached_tokens_in: r.cached_tokens_in,
            usage_estimated: r.usage_estimated,
            cost_nanousd: r.cost_nanousd,
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            cache_hit: r.cache_hit,
            fallback_used: r.fallback_used,
            attempts: r.attempts,
            node: &r.node,
            end_user: &r.end_user,
            upstream_model: &r.upstream_model,
        }
    }
}

/// The table the gateway creates when it is missing; runs on 18.16 and on current
/// servers. ReplacingMergeTree collapses rows with equal sorting keys when parts
/// merge, and `FINAL` collapses them at query time: a batch shipped twice (the
/// insert succeeded but its acknowledgement was lost, or a crash before the cursor
/// moved) is counted once. The key holds `ts_ms` and `node` so that two calls that
/// reused one client-chosen `x-request-id` stay two rows: on different nodes by
/// `node`, on one node by `ts_ms`, which a node keeps unique per id
/// ([`super::AuditLog::unique_start_ms`]). A replayed row repeats every column, so it
/// always matches its original.
pub fn create_table_sql(database: &str, table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {database}.{table} (
    request_id String,
    ts DateTime,
    ts_ms UInt64,
    tenant String,
    api_key_id String,
    endpoint String,
    model_requested String,
    model String,
    provider String,
    region String,
    stream UInt8,
    status UInt16,
    error_code String,
    tokens_in UInt32,
    tokens_out UInt32,
    cached_tokens_in UInt32,
    usage_estimated UInt8,
    cost_nanousd UInt64,
    latency_ms UInt32,
    ttft_ms UInt32,
    cache_hit UInt8,
    fallback_used UInt8,
    attempts UInt8,
    node String,
    end_user String,
    upstream_model String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, ts, request_id, ts_ms, node)"
    )
}

/// Columns added to the contract after earlier versions had created their tables, as
/// (name, type), in the order they were added; [`create_table_sql`] ends with them.
/// At start-up each one an existing table lacks is added with `ALTER TABLE ... ADD
/// COLUMN`, and ClickHouse gives the rows written before the type's default (empty):
/// an upgrade needs no manual migration. 18.16 has no `ADD COLUMN IF NOT EXISTS`, so
/// `system.columns` is read first.
pub const ADDED_COLUMNS: &[(&str, &str)] = &[("end_user", "String"), ("upstream_model", "String")];

/// One ClickHouse server, as the config names it.
pub struct ClickHouse {
    client: clickhouse::Client,
    database: String,
    table: String,
    table_ready: bool,
}

#[derive(Debug)]
pub enum ChError {
    TimedOut(Duration),
    Server(clickhouse::error::Error),
}

impl std::fmt::Display for ChError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChError::TimedOut(d) => write!(f, "no answer within {} ms", d.as_millis()),
            ChError::Server(e) => write!(f, "{e}"),
        }
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> Result<T, ChError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(ChError::Server),
        Err(_) => Err(ChError::TimedOut(limit)),
    }
}

impl ClickHouse {
    pub fn new(conf: &ClickHouseConf) -> ClickHouse {
        let mut client = clickhouse::Client::default()
            .with_url(&conf.url)
            .with_user(&conf.user)
            .with_validation(false);
        if let Some(p) = &conf.password {
            client = client.with_password(p);
        }
        ClickHouse {
            client,
            database: conf.database.clone(),
            table: conf.table.clone(),
            table_ready: false,
        }
    }

    /// Creates the database and the table when missing, and adds the
    /// [`ADDED_COLUMNS`] a table created by an earlier version lacks.
    async fn ensure_table(&self) -> Result<(), ChError> {
        let db = format!("CREATE DATABASE IF NOT EXISTS {}", self.database);
        bounded(INSERT_TIMEOUT, self.client.query(&db).execute()).await?;
        let ddl = create_table_sql(&self.database, &self.table);
        let created = bounded(INSERT_TIMEOUT, self.client.query(&ddl).execute()).await;
        if let Err(e @ ChError::TimedOut(_)) = created {
            return Err(e);
        }
        // A refused CREATE (the table exists, the user may not create) still lets an
        // old table gain its columns.
        let added = self.add_missing_columns().await;
        created.and(added)
    }

    /// The names of the table's columns.
    async fn columns(&self) -> Result<Vec<String>, ChError> {
        let query = self
            .client
            .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
            .bind(self.database.as_str())
            .bind(self.table.as_str());
        let bytes = bounded(QUERY_TIMEOUT, async move {
            query.fetch_bytes("TabSeparated")?.collect().await
        })
        .await?;
        Ok(bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect())
    }

    /// Adds each of [`ADDED_COLUMNS`] the table lacks. Another node upgrading at the
    /// same moment may add it first (18.16 then refuses ours: the column exists), so a
    /// refused ALTER counts as done when the column is there afterwards.
    async fn add_missing_columns(&self) -> Result<(), ChError> {
        let have = self.columns().await?;
        for (name, ty) in ADDED_COLUMNS {
            if have.iter().any(|c| c == name) {
                continue;
            }
            let sql = format!(
                "ALTER TABLE {}.{} ADD COLUMN {name} {ty}",
                self.database, self.table
            );
            if let Err(e) = bounded(INSERT_TIMEOUT, self.client.query(&sql).execute()).await {
                if !self.columns().await?.iter().any(|c| c == name) {
                    return Err(e);
                }
            }
            log::info!(
                "audit: added column {name} {ty} to {}.{} (rows written before have it empty)",
                self.database,
                self.table
            );
        }
        Ok(())
    }

    /// Inserts `rows` as one INSERT; `Ok` means ClickHouse acknowledged all of them.
    /// The table is created first when this process has not seen it yet; a refused
    /// DDL (a user without CREATE rights on an existing table) does not stop the insert.
    pub async fn insert(&mut self, rows: &[AuditRow]) -> Result<(), ChError> {
        let mut ddl_error = None;
        if !self.table_ready {
            match self.ensure_table().await {
                Ok(()) => {}
                Err(e @ ChError::TimedOut(_)) => return Err(e),
                Err(e) => ddl_error = Some(e),
            }
        }
        let table = format!("{}.{}", self.database, self.table);
        let client = &self.client;
        let result = bounded(INSERT_TIMEOUT, async move {
            let mut insert = client
                .insert_unescaped::<ChRow>(&table)
                .await?
                .with_timeouts(Some(INSERT_TIMEOUT), Some(INSERT_TIMEOUT));
            for r in rows {
                insert.write(&ChRow::from(r)).await?;
            }
            insert.end().await
        })
        .await;
        // After a failure the table may be gone: create it again before the next insert.
        self.table_ready = result.is_ok();
        match (result, ddl_error) {
            (Err(e), Some(ddl)) => Err(ChError::Server(clickhouse::error::Error::Other(
                format!("creating the table failed ({ddl}), then the insert: {e}").into(),
            ))),
            (r, _) => r,
        }
    }

    /// `tenant`'s rows since `since_ms`, oldest first, at most `limit`, each request
    /// once (`FINAL` collapses rows shipped twice).
    pub async fn query(
        &self,
        tenant: &str,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, ChError> {
        let sql = format!(
            "SELECT * FROM {}.{} FINAL WHERE tenant = ? AND ts >= toDateTime(?) AND ts_ms >= ? \
             ORDER BY ts_ms, request_id LIMIT {limit}",
            self.database, self.table
        );
        let query = self
            .client
            .query(&sql)
            .bind(tenant)
            .bind(since_ms / 1000)
            .bind(since_ms)
            .with_setting("output_format_json_quote_64bit_integers", "0");
        let bytes = bounded(QUERY_TIMEOUT, async move {
            query.fetch_bytes("JSONEachRow")?.collect().await
        })
        .await?;
        let mut rows = Vec::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v = serde_json::from_slice(line).map_err(|e| {
                ChError::Server(clickhouse::error::Error::BadResponse(e.to_string()))
            })?;
            rows.push(v);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::Row;

    /// The column names of [`create_table_sql`], in order.
    fn ddl_columns() -> Vec<(String, String)> {
        let ddl = create_table_sql("db", "t");
        let body = &ddl[ddl.find('(').unwrap() + 1..ddl.find(") ENGINE").unwrap()];
        body.split(',')
            .map(|c| {
                let (name, ty) = c.trim().split_once(' ').unwrap();
                (name.to_string(), ty.to_string())
            })
            .collect()
    }

    #[test]
    fn the_table_the_row_and_the_spool_line_have_the_same_columns_in_order() {
        let ddl: Vec<String> = ddl_columns().into_iter().map(|(n, _)| n).collect();
        assert_eq!(ddl, ChRow::COLUMN_NAMES);
        let line = match serde_json::to_value(AuditRow::default()).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect::<Vec<_>>(),
            _ => unreachable!(),
        };
        assert_eq!(ddl, line);
    }

    #[test]
    fn the_added_columns_end_the_created_table_with_their_types() {
        let ddl = ddl_columns();
        let tail = &ddl[ddl.len() - ADDED_COLUMNS.len()..];
        let added: Vec<(String, String)> = ADDED_COLUMNS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(tail, added);
        assert!(ADDED_COLUMNS.contains(&("end_user", "String")));
    }
}
