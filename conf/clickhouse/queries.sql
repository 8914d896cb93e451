-- Per-tenant billing and on-call queries over llm_audit. Every query reads the table
-- with FINAL, which collapses rows shipped twice (see schema.sql), so each request
-- counts once. Money stays integer nano-USD (divide by 1e9 exactly, in the billing
-- system, never with floats). Parameters use clickhouse-client's {name:Type} syntax:
--   clickhouse-client --param_tenant=acme --param_month=2026-11-01 --query "$(...)"
-- (ClickHouse 18.16 predates query parameters: substitute quoted literals there; the
-- queries themselves run on 18.16 and on current servers, tests/e2e/test_audit_clickhouse.py
-- runs them against 18.16.)

-- name: tenant_monthly_bill
-- One tenant's bill for one UTC calendar month ({month:Date} = its first day).
SELECT
    tenant,
    count() AS requests,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cached_tokens_in) AS cached_tokens_in,
    sum(cost_nanousd) AS cost_nanousd,
    sum(usage_estimated) AS estimated_requests
FROM llm_audit FINAL
WHERE tenant = {tenant:String}
  AND ts >= toDateTime({month:Date})
  AND ts < toDateTime(addMonths({month:Date}, 1))
GROUP BY tenant;

-- name: tenant_spend_by_model
-- Where one tenant's money went in one UTC month, by model and provider.
SELECT
    model,
    provider,
    count() AS requests,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cost_nanousd) AS cost_nanousd,
    sum(fallback_used) AS fallbacks
FROM llm_audit FINAL
WHERE tenant = {tenant:String}
  AND ts >= toDateTime({month:Date})
  AND ts < toDateTime(addMonths({month:Date}, 1))
GROUP BY model, provider
ORDER BY cost_nanousd DESC, model, provider;

-- name: top_tenants_last_hour
-- On-call: who spends the most right now (the last 60 minutes).
SELECT
    tenant,
    count() AS requests,
    sum(cost_nanousd) AS cost_nanousd,
    sum(tokens_out) AS tokens_out,
    countIf(status >= 400) AS refused_or_failed
FROM llm_audit FINAL
WHERE ts >= now() - 3600
GROUP BY tenant
ORDER BY cost_nanousd DESC, tenant
LIMIT 20;

-- name: tenant_errors_last_hour
-- On-call: one tenant's refusals and failures in the last 60 minutes, by status and code.
SELECT
    status,
    error_code,
    count() AS requests
FROM llm_audit FINAL
WHERE tenant = {tenant:String}
  AND ts >= now() - 3600
  AND status >= 400
GROUP BY status, error_code
ORDER BY requests DESC, status;

-- name: tenant_spend_by_end_user
-- Which of one tenant's own end users spent its money in one UTC month (end_user is
-- empty for requests that named none).
SELECT
    end_user,
    count() AS requests,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cost_nanousd) AS cost_nanousd
FROM llm_audit FINAL
WHERE tenant = {tenant:String}
  AND ts >= toDateTime({month:Date})
  AND ts < toDateTime(addMonths({month:Date}, 1))
GROUP BY end_user
ORDER BY cost_nanousd DESC, end_user
LIMIT 100;
