-- llm_audit for current ClickHouse servers (22.x and later): the recommended DDL.
--
-- The gateway creates a plainer table by itself when none exists (it must also run on
-- ClickHouse 18.16, which has no DateTime64 and no LowCardinality without an
-- experimental flag); on a current server create this one first, before the gateway's
-- first start:  clickhouse-client --database default --multiquery < schema.sql
--
-- Wire-compatible with the gateway's inserts (RowBinary, columns named): every
-- contract column keeps its type on the wire (LowCardinality(String) travels as
-- String, DateTime('UTC') as DateTime); ts64 is computed by the server.
--
-- Dedupe: a batch can reach ClickHouse twice (insert acknowledged but the
-- acknowledgement lost, or a crash before the shipper's cursor moved). A replayed row
-- repeats every column, so ReplacingMergeTree collapses it with its original when
-- parts merge, and queries read with FINAL (see queries.sql) never count it twice.
-- The sorting key holds ts_ms and node so that calls that reused one client-chosen
-- x-request-id stay one row each (a node never gives one such id the same ts_ms twice).
--
-- Upgrading: columns added since a table was created (end_user, upstream_model) are added by the
-- gateway at start-up with ALTER TABLE ... ADD COLUMN when missing; rows written
-- before have them empty. To do it by hand first (a user without ALTER rights):
--   ALTER TABLE llm_audit ADD COLUMN IF NOT EXISTS end_user String;
--   ALTER TABLE llm_audit ADD COLUMN IF NOT EXISTS upstream_model String;
CREATE TABLE IF NOT EXISTS llm_audit
(
    request_id       String,
    ts               DateTime('UTC'),
    ts_ms            UInt64 CODEC(Delta, ZSTD(1)),
    ts64             DateTime64(3, 'UTC') MATERIALIZED fromUnixTimestamp64Milli(toInt64(ts_ms)),
    tenant           LowCardinality(String),
    api_key_id       LowCardinality(String),
    endpoint         LowCardinality(String),
    model_requested  LowCardinality(String),
    model            LowCardinality(String),
    provider         LowCardinality(String),
    region           LowCardinality(String),
    stream           UInt8,
    status           UInt16,
    error_code       LowCardinality(String),
    tokens_in        UInt32,
    tokens_out       UInt32,
    cached_tokens_in UInt32,
    usage_estimated  UInt8,
    cost_nanousd     UInt64,
    latency_ms       UInt32,
    ttft_ms          UInt32,
    cache_hit        UInt8,
    fallback_used    UInt8,
    attempts         UInt8,
    node             LowCardinality(String),
    -- The tenant's own end user (x-gateway-end-user, OpenAI `user`, Anthropic
    -- metadata.user_id), empty when none: plain String, an end user per row can run to
    -- millions of distinct values, past what LowCardinality suits.
    end_user         String,
    -- The provider's name for the model that served: which deployment (an upstream
    -- model or an Azure deployment name) answered; empty when none was tried.
    upstream_model   LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, ts, request_id, ts_ms, node)
-- Keep two years and a month of billing history; adjust to your retention policy.
TTL ts + INTERVAL 25 MONTH DELETE
SETTINGS index_granularity = 8192;
