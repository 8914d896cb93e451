//! Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! Label values come only from the config (tenant ids, model and provider names) or
//! from small closed sets (status codes, reasons): never from request data, so the
//! number of series stays bounded whatever clients send.

use crate::audit::{AuditMetrics, AuditRow};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// How one upstream attempt (one deployment tried) ended, for
/// `llmgw_upstream_attempts_total{provider,result}`. Closed, so the label's values are
/// known up front and every provider's series can exist at 0 before the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptResult {
    /// The upstream answered and the answer was delivered (or is being).
    Ok,
    /// No connection (refused, DNS, TLS, connect timeout).
    Connect,
    /// Connected, but no first token within `first_token_ms`.
    FirstTokenTimeout,
    /// A stream stalled for longer than `idle_ms` between chunks.
    IdleTimeout,
    Status429,
    Status5xx,
    /// A 4xx other than 429.
    Status4xx,
    /// The connection was reset or closed mid-answer.
    Reset,
    /// An answer the gateway could not read (not JSON, malformed SSE).
    BadResponse,
    /// The client left, so the gateway abandoned the attempt.
    Cancelled,
}

impl AttemptResult {
    pub const ALL: [AttemptResult; 10] = [
        AttemptResult::Ok,
        AttemptResult::Connect,
        AttemptResult::FirstTokenTimeout,
        AttemptResult::IdleTimeout,
        AttemptResult::Status429,
        AttemptResult::Status5xx,
        AttemptResult::Status4xx,
        AttemptResult::Reset,
        AttemptResult::BadResponse,
        AttemptResult::Cancelled,
    ];

    /// The `result` label value (DESIGN.md, "Deployments").
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Connect => "connect",
            AttemptResult::FirstTokenTimeout => "first_token_timeout",
            AttemptResult::IdleTimeout => "idle_timeout",
            AttemptResult::Status429 => "status_429",
            AttemptResult::Status5xx => "status_5xx",
            AttemptResult::Status4xx => "status_4xx",
            AttemptResult::Reset => "reset",
            AttemptResult::BadResponse => "bad_response",
            AttemptResult::Cancelled => "cancelled",
        }
    }
}

/// A request's timings, exact (the audit row has them in whole milliseconds).
pub struct Timing {
    pub latency: std::time::Duration,
    /// Until the first content byte, when one was sent.
    pub ttft: Option<std::time::Duration>,
}

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    ttft: HistogramVec,
    inter_token: HistogramVec,
    tokens: IntCounterVec,
    cost: IntCounterVec,
    rejections: IntCounterVec,
    upstream_failures: IntCounterVec,
    upstream_attempts: IntCounterVec,
    fallbacks: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    /// Per deployment, read at scrape time: attempts in flight on this node, the
    /// remaining cooldown, this minute's requests against the quota, the TTFT average.
    pub deployment_in_flight: IntGaugeVec,
    pub deployment_cooldown_ms: IntGaugeVec,
    pub deployment_requests_minute: IntGaugeVec,
    pub deployment_rpm: IntGaugeVec,
    pub deployment_ttft_ms: IntGaugeVec,
    pub budget_used_ppm: IntGaugeVec,
    pub spend_velocity_pct: IntGaugeVec,
    pub spend_this_hour: IntGaugeVec,
    /// 1 while a tenant's spend guard is engaged on this node.
    pub spend_guard_engaged: IntGaugeVec,
    pub audit: AuditMetrics,
    pub alerts: crate::alerts::AlertMetrics,
    /// Failed calls to the shared counter store (Redis) since start.
    pub limits_store_errors: IntGauge,
    cache_requests: IntCounterVec,
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_evictions: IntCounter,
    pub cache_discarded: IntCounter,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Registers a single (unlabelled) metric and hands it back.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: M,
) -> prometheus::Result<M> {
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new_custom(Some("llmgw".into()), None)?;
        let secs = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let audit = AuditMetrics::new(&r)?;
        let alerts = crate::alerts::AlertMetrics::new(&r)?;
        let limits_store_errors = IntGauge::new(
            "limits_store_errors",
            "Failed calls to the shared counter store since start",
        )?;
        r.register(Box::new(limits_store_errors.clone()))?;
        Ok(Metrics {
            cache_requests: counter(
                &r,
                "cache_requests_total",
                "Chat and messages requests by cache result (hit, miss, bypass)",
                &["tenant", "result"],
            )?,
            cache_bytes: registered(
                &r,
                IntGauge::new(
                    "cache_bytes",
                    "Bytes held by the response cache (bounded by cache.max_bytes)",
                )?,
            )?,
            cache_entries: registered(
                &r,
                IntGauge::new("cache_entries", "Answers held by the response cache")?,
            )?,
            cache_evictions: registered(
                &r,
                IntCounter::new(
                    "cache_evictions_total",
                    "Answers evicted from the response cache to stay within cache.max_bytes",
                )?,
            )?,
            cache_discarded: registered(
                &r,
                IntCounter::new(
                    "cache_discarded_total",
                    "Cache fills dropped because the answer did not end complete",
                )?,
            )?,
            requests: counter(
                &r,
                "requests_total",
                "Requests by tenant, endpoint, model, provider and status",
                &["tenant", "endpoint", "model", "provider", "status"],
            )?,
            latency: histogram(
                &r,
                "request_duration_seconds",
                "Time to the last byte",
                &["tenant", "endpoint"],
                secs.clone(),
            )?,
            ttft: histogram(
                &r,
                "ttft_seconds",
                "Time to the first content byte",
                &["tenant", "model"],
                secs,
            )?,
            inter_token: histogram(
                &r,
                "inter_token_seconds",
                "Mean time between streamed tokens of a request, after the first",
                &["tenant", "model"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                ],
            )?,
            tokens: counter(
                &r,
                "tokens_total",
                "Tokens billed, by direction",
                &["tenant", "model", "direction"],
            )?,
            cost: counter(
                &r,
                "cost_nanousd_total",
                "Cost billed in nano-USD",
                &["tenant", "model"],
            )?,
            rejections: counter(
                &r,
                "rejections_total",
                "Requests refused by rate limits and budgets",
                &["tenant", "reason"],
            )?,
            upstream_failures: counter(
                &r,
                "upstream_failures_total",
                "Calls that ended in an upstream failure",
                &["provider", "code"],
            )?,
            upstream_attempts: counter(
                &r,
                "upstream_attempts_total",
                "Upstream attempts (each deployment tried, also those a fallback rescued), by how they ended",
                &["provider", "result"],
            )?,
            fallbacks: counter(
                &r,
                "fallbacks_total",
                "Requests served by other than their first choice",
                &["tenant", "model"],
            )?,
            circuit_state: gauge(
                &r,
                "circuit_state",
                "Provider circuit: 0 closed, 1 half-open, 2 open",
                &["provider"],
            )?,
            deployment_in_flight: gauge(
                &r,
                "deployment_in_flight",
                "Attempts in flight on this node, per model deployment",
                &["model", "deployment"],
            )?,
            deployment_cooldown_ms: gauge(
                &r,
                "deployment_cooldown_ms",
                "Milliseconds until a deployment the provider asked to pause is tried again (0: usable)",
                &["model", "deployment"],
            )?,
            deployment_requests_minute: gauge(
                &r,
                "deployment_requests_this_minute",
                "Requests sent to a deployment in the current UTC minute (all nodes, on Redis)",
                &["model", "deployment"],
            )?,
            deployment_rpm: gauge(
                &r,
                "deployment_rpm_quota",
                "A deployment's requests-per-minute quota (0: none)",
                &["model", "deployment"],
            )?,
            deployment_ttft_ms: gauge(
                &r,
                "deployment_ttft_ewma_ms",
                "Moving average of a deployment's time to first byte on this node, ms",
                &["model", "deployment"],
            )?,
            budget_used_ppm: gauge(
                &r,
                "budget_used_ppm",
                "Monthly budget used (settled + reserved), parts per million",
                &["tenant"],
            )?,
            spend_velocity_pct: gauge(
                &r,
                "spend_velocity_percent",
                "This hour's spend as a percentage of the average hour of the previous 24",
                &["tenant"],
            )?,
            spend_guard_engaged: gauge(
                &r,
                "spend_guard_engaged",
                "1 while the tenant's spend guard is engaged (throttling, blocking or alerting)",
                &["tenant"],
            )?,
            spend_this_hour: gauge(
                &r,
                "spend_this_hour_nanousd",
                "Spend in the current UTC hour",
                &["tenant"],
            )?,
            audit,
            alerts,
            limits_store_errors,
            registry: r,
        })
    }

    /// Accounts for one finished request, from its audit row and its timings.
    pub fn observe(&self, row: &AuditRow, timing: &Timing) {
        let status = row.status.to_string();
        self.requests
            .with_label_values(&[
                &row.tenant,
                &row.endpoint,
                &row.model,
                &row.provider,
                &status,
            ])
            .inc();
        self.latency
            .with_label_values(&[&row.tenant, &row.endpoint])
            .observe(timing.latency.as_secs_f64());
        if let Some(ttft) = timing.ttft {
            self.ttft
                .with_label_values(&[&row.tenant, &row.model])
                .observe(ttft.as_secs_f64());
            // Streams only: the span from the first to the last byte shared by the
            // tokens after the first (per-request mean; per-chunk timing would cost the
            // hot path).
            if row.stream == 1 && row.tokens_out > 1 && !row.model.is_empty() {
                let span = timing.latency.saturating_sub(ttft).as_secs_f64();
                self.inter_token
                    .with_label_values(&[&row.tenant, &row.model])
                    .observe(span / f64::from(row.tokens_out - 1));
            }
        }
        // A cache hit's row carries the original usage, but nothing was billed.
        if !row.model.is_empty() && row.cache_hit == 0 {
            self.tokens
                .with_label_values(&[&row.tenant, &row.model, "in"])
                .inc_by(row.tokens_in.into());
            self.tokens
                .with_label_values(&[&row.tenant, &row.model, "out"])
                .inc_by(row.tokens_out.into());
            self.cost
                .with_label_values(&[&row.tenant, &row.model])
                .inc_by(row.cost_nanousd);
        }
        match row.error_code.as_str() {
            "rate_limited" | "budget_exceeded" | "spend_guard" => self
                .rejections
                .with_label_values(&[&row.tenant, &row.error_code])
                .inc(),
            "upstream_unavailable" | "upstream_timeout" | "bad_upstream_response" => self
                .upstream_failures
                .with_label_values(&[&row.provider, &row.error_code])
                .inc(),
            _ => {}
        }
        if row.fallback_used == 1 {
            self.fallbacks
                .with_label_values(&[&row.tenant, &row.model])
                .inc();
        }
    }

    /// Counts one upstream attempt of `provider` (a configured provider's name).
    pub fn upstream_attempt(&self, provider: &str, result: AttemptResult) {
        self.upstream_attempts
            .with_label_values(&[provider, result.as_str()])
            .inc();
    }

    /// Creates every `upstream_attempts_total` series of these providers at 0 (series
    /// already there keep their counts): a rate over a series that appears only with
    /// its first failure misses that failure, and dashboards should list a provider
    /// before anything went wrong with it. Called at start-up and after each reload
    /// (a provider that a reload removed keeps its series until the process ends).
    pub fn register_providers<'a>(&self, providers: impl IntoIterator<Item = &'a str>) {
        for p in providers {
            for r in AttemptResult::ALL {
                self.upstream_attempts.with_label_values(&[p, r.as_str()]);
            }
        }
    }

    /// Counts one request's cache result (`hit`, `miss` or `bypass`).
    pub fn cache_result(&self, tenant: &str, result: &str) {
        self.cache_requests
            .with_label_values(&[tenant, result])
            .inc();
    }

    /// Brings the cache gauges and counters up to the store's figures (at scrape time).
    pub fn cache_stats(&self, s: crate::cache::Stats) {
        self.cache_bytes.set(s.bytes.min(i64::MAX as usize) as i64);
        self.cache_entries
            .set(s.entries.min(i64::MAX as usize) as i64);
        self.cache_evictions
            .inc_by(s.evictions.saturating_sub(self.cache_evictions.get()));
        self.cache_discarded
            .inc_by(s.discarded.saturating_sub(self.cache_discarded.get()));
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 << 10);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempts(m: &Metrics) -> Vec<String> {
        String::from_utf8_lossy(&m.render())
            .lines()
            .filter(|l| l.starts_with("llmgw_upstream_attempts_total{"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn attempt_series_exist_at_zero_for_every_provider_then_count() {
        let m = Metrics::new().unwrap();
        assert!(attempts(&m).is_empty());
        m.register_providers(["openai", "anthropic"]);
        let lines = attempts(&m);
        assert_eq!(lines.len(), 2 * AttemptResult::ALL.len());
        assert!(lines.iter().all(|l| l.ends_with(" 0")), "{lines:?}");
        for r in AttemptResult::ALL {
            let want = format!(
                "llmgw_upstream_attempts_total{{provider=\"openai\",result=\"{}\"}} 0",
                r.as_str()
            );
            assert!(lines.contains(&want), "missing {want}");
        }

        m.upstream_attempt("openai", AttemptResult::Status429);
        m.upstream_attempt("openai", AttemptResult::Status429);
        m.upstream_attempt("openai", AttemptResult::Ok);
        // A reload adding a provider: the new one at 0, the counts of the others kept.
        m.register_providers(["openai", "anthropic", "azure-east"]);
        let lines = attempts(&m);
        assert_eq!(lines.len(), 3 * AttemptResult::ALL.len());
        for (series, n) in [
            ("provider=\"openai\",result=\"status_429\"", 2),
            ("provider=\"openai\",result=\"ok\"", 1),
            ("provider=\"openai\",result=\"reset\"", 0),
            ("provider=\"azure-east\",result=\"first_token_timeout\"", 0),
        ] {
            let want = format!("llmgw_upstream_attempts_total{{{series}}} {n}");
            assert!(lines.contains(&want), "missing {want}: {lines:?}");
        }
    }

    #[test]
    fn attempt_result_labels_are_the_contract_s() {
        let labels: Vec<&str> = AttemptResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ok",
                "connect",
                "first_token_timeout",
                "idle_timeout",
                "status_429",
                "status_5xx",
                "status_4xx",
                "reset",
                "bad_response",
                "cancelled"
            ]
        );
    }
}
