//! The `alerts:` section: where events for on-call go (webhooks), and when budget and
//! velocity events fire. The validated form; the raw one is in `raw.rs` with the others.

use super::money::usd_to_nanousd;
use super::net::base_url;
use super::raw::{RawAlerts, RawWebhook, Sec};
use super::report::{child, item, Report};
use super::sections::env_secret;
use super::BaseUrl;
use std::collections::HashSet;

/// How a webhook's body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `{"id","type","at","tenant","key_id", ...figures}`.
    Json,
    /// A Slack incoming webhook: `{"text": "..."}`.
    Slack,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Label of the metrics and name of its queue; unique.
    pub name: String,
    pub url: BaseUrl,
    /// The HMAC key of `x-gateway-signature`, read from `secret_env` at load.
    pub secret: Option<String>,
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConf {
    pub webhooks: Vec<Webhook>,
    /// Fractions of each budget, in parts per million (0.8 is 800000), ascending and
    /// distinct: integers so that "spent crossed 80 %" is exact integer arithmetic.
    pub budget_thresholds_ppm: Vec<u64>,
    pub velocity: VelocityAlert,
}

/// `spend_velocity` fires when this hour's spend is above `factor` x the trailing
/// 24 h hourly average and above `min_hourly`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VelocityAlert {
    /// `factor` x 1000, integer for the comparison.
    pub factor_milli: u64,
    pub min_hourly_nanousd: u64,
}

/// The defaults of DESIGN.md's example: thresholds at 50, 80 and 100 %, velocity 5x
/// above $10 an hour, so an `alerts:` section with only webhooks still says the
/// useful things.
const DEFAULT_THRESHOLDS_PPM: [u64; 3] = [500_000, 800_000, 1_000_000];
const DEFAULT_VELOCITY: VelocityAlert = VelocityAlert {
    factor_milli: 5_000,
    min_hourly_nanousd: 10_000_000_000,
};

/// Absent section: `None` (no alerts; events are dropped where they are raised).
pub(super) fn alerts(sec: Sec<RawAlerts>, report: &mut Report) -> Option<Option<AlertsConf>> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => return Some(None),
    };
    let mut ok = true;
    let mut webhooks = Vec::new();
    let mut names = HashSet::new();
    for (i, w) in raw.webhooks.into_iter().enumerate() {
        let at = item("alerts.webhooks", i);
        // Checked on every entry, valid or not: the second of two names is the typo.
        if !names.insert(w.name.trim().to_string()) {
            report.error(child(&at, "name"), format!("`{}` is used twice", w.name));
            ok = false;
        }
        match webhook(w, &at, report) {
            Some(w) => webhooks.push(w),
            None => ok = false,
        }
    }
    if ok && webhooks.is_empty() {
        report.warn(
            "alerts.webhooks",
            "no webhooks: alerts are raised but sent nowhere",
        );
    }
    let budget_thresholds_ppm = match raw.budget_thresholds {
        None => DEFAULT_THRESHOLDS_PPM.to_vec(),
        Some(list) => {
            let mut ppm = Vec::new();
            for (i, t) in list.into_iter().enumerate() {
                if !(t.is_finite() && t > 0.0 && t <= 10.0) {
                    report.error(
                        item("alerts.budget_thresholds", i),
                        format!("{t} is not a fraction of a budget above 0 (1.0 is 100 %)"),
                    );
                    ok = false;
                    continue;
                }
                // Same decimal reading as money: 0.8 is 800000 ppm exactly.
                match usd_to_nanousd(t) {
                    Ok(n) if n % 1000 == 0 => ppm.push(n / 1000),
                    _ => {
                        report.error(
                            item("alerts.budget_thresholds", i),
                            format!("{t} has more than 6 decimal places"),
                        );
                        ok = false;
                    }
                }
            }
            ppm.sort_unstable();
            ppm.dedup();
            ppm
        }
    };
    let velocity = match raw.velocity {
        None => DEFAULT_VELOCITY,
        Some(v) => {
            let factor_milli = if v.factor.is_finite() && v.factor >= 1.0 && v.factor <= 1e6 {
                (v.factor * 1000.0).round() as u64
            } else {
                report.error(
                    "alerts.velocity.factor",
                    format!("{} must be a number from 1 to 1000000", v.factor),
                );
                ok = false;
                0
            };
            let min_hourly_nanousd = match usd_to_nanousd(v.min_hourly_usd) {
                Ok(n) => n,
                Err(e) => {
                    report.error("alerts.velocity.min_hourly_usd", e);
                    ok = false;
                    0
                }
            };
            VelocityAlert {
                factor_milli,
                min_hourly_nanousd,
            }
        }
    };
    ok.then_some(Some(AlertsConf {
        webhooks,
        budget_thresholds_ppm,
        velocity,
    }))
}

fn webhook(w: RawWebhook, at: &str, report: &mut Report) -> Option<Webhook> {
    let mut ok = true;
    let name = w.name.trim().to_string();
    let label_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(label_safe) {
        report.error(
            child(at, "name"),
            format!("`{name}` must be 1 to 64 letters, digits, `_`, `-` or `.`"),
        );
        ok = false;
    }
    let url = match base_url(&w.url) {
        Ok(u) => Some(u),
        Err(e) => {
            report.error(child(at, "url"), e);
            ok = false;
            None
        }
    };
    let secret = match w.secret_env.as_deref() {
        None => None,
        Some(var) => match env_secret(var) {
            Ok(s) => Some(s),
            Err(why) => {
                report.error(child(at, "secret_env"), why);
                ok = false;
                None
            }
        },
    };
    let format = match w.format.as_deref().map(str::trim) {
        None | Some("json") => WebhookFormat::Json,
        Some("slack") => WebhookFormat::Slack,
        Some(other) => {
            report.error(
                child(at, "format"),
                format!("unknown variant `{other}`, expected one of `json`, `slack`"),
            );
            ok = false;
            WebhookFormat::Json
        }
    };
    match (ok, url) {
        (true, Some(url)) => Some(Webhook {
            name,
            url,
            secret,
            format,
        }),
        _ => None,
    }
}

#[cfg(test)]
#[path = "alerts_tests.rs"]
mod tests;
