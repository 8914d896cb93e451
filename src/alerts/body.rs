//! What a webhook receives: the event as JSON (or a Slack `text` line), and its
//! signature.
//!
//! The JSON body is made once, when the event is queued, and stored as it is in the
//! spool; every retry, and every format, is rendered from that stored object, so a
//! retry after a restart sends the same bytes and the same signature.

use super::Event;
use crate::config::WebhookFormat;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `{"id","type","at","tenant","key_id", ...figures}` (DESIGN.md, "Alerts").
pub fn json_body(e: &Event) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), e.id().into());
    m.insert("type".into(), e.kind.as_str().into());
    m.insert("at".into(), crate::audit::time::rfc3339(e.at_ms).into());
    m.insert("tenant".into(), e.tenant.clone().into());
    m.insert("key_id".into(), e.key_id.clone().into());
    for (k, v) in &e.figures {
        // The five fields above are the contract's; a figure never overrides one.
        if !m.contains_key(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    m
}

/// The exact bytes POSTed to a webhook of `format`.
pub fn render(format: WebhookFormat, body: &Map<String, Value>) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => Value::Object(body.clone()),
        WebhookFormat::Slack => serde_json::json!({ "text": slack_text(body) }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256 of the body bytes>`, the `x-gateway-signature` value.
pub fn signature(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), body))
    )
}

/// HMAC-SHA256 (RFC 2104) on the sha2 crate the tree already has: a dozen lines, and
/// checked against RFC 4231's vectors in the tests.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn text<'a>(body: &'a Map<String, Value>, name: &str) -> &'a str {
    body.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A USD figure for people: cents, from the exact `*_usd` string the body carries.
fn dollars(body: &Map<String, Value>, name: &str) -> String {
    let exact = text(body, name);
    match exact.split_once('.') {
        Some((whole, frac)) => format!("${whole}.{:0<2.2}", frac),
        None if exact.is_empty() => "$?".into(),
        None => format!("${exact}.00"),
    }
}

fn percent(body: &Map<String, Value>, name: &str) -> String {
    match body.get(name).and_then(Value::as_u64) {
        Some(ppm) if ppm % 10_000 == 0 => format!("{} %", ppm / 10_000),
        Some(ppm) => format!("{:.1} %", ppm as f64 / 10_000.0),
        None => "?".into(),
    }
}

/// One human-readable line per event, for Slack (and the log).
pub fn slack_text(body: &Map<String, Value>) -> String {
    let kind = text(body, "type");
    let tenant = text(body, "tenant");
    let key = text(body, "key_id");
    let who = if key.is_empty() {
        format!("tenant `{tenant}`")
    } else {
        format!("key `{key}` of tenant `{tenant}`")
    };
    let line = match kind {
        "budget_threshold" => format!(
            "{who} has used {} of its {} budget: {} of {}",
            percent(body, "threshold_ppm"),
            text(body, "window"),
            dollars(body, "spent_usd"),
            dollars(body, "budget_usd"),
        ),
        // A tenant with no spend in the trailing 24 h has no ratio to state.
        "spend_velocity" if text(body, "ratio") == "inf" => format!(
            "{who} spent {} this hour, with no spend in the trailing 24 h",
            dollars(body, "spend_this_hour_usd"),
        ),
        "spend_velocity" => format!(
            "{who} spent {} this hour, {}x its trailing 24 h average of {} an hour",
            dollars(body, "spend_this_hour_usd"),
            text(body, "ratio"),
            dollars(body, "hourly_avg_usd"),
        ),
        "guard_engaged" | "guard_cleared" => {
            let what = if kind == "guard_engaged" {
                "engaged"
            } else {
                "cleared"
            };
            let action = text(body, "action");
            if action.is_empty() {
                format!("spend guard {what} for {who}")
            } else {
                format!("spend guard {what} for {who} (action: {action})")
            }
        }
        "circuit_open" | "circuit_closed" => format!(
            "circuit of provider `{}` {} on node `{}`",
            text(body, "provider"),
            if kind == "circuit_open" {
                "opened"
            } else {
                "closed"
            },
            text(body, "node"),
        ),
        "audit_shipping_stalled" => format!(
            "audit shipping to ClickHouse stalled on node `{}`: the oldest unshipped row is {} s old",
            text(body, "node"),
            body.get("oldest_unshipped_age_s")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        ),
        other => format!("{other} for {who}"),
    };
    format!("[llm-gateway] {kind}: {line} ({})", text(body, "at"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::EventKind;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signature_is_of_the_exact_body_bytes() {
        let s = signature("s3cret", b"{\"a\":1}");
        assert!(s.starts_with("sha256="));
        assert_eq!(s.len(), 7 + 64);
        assert_ne!(s, signature("s3cret", b"{\"a\": 1}"));
        assert_ne!(s, signature("other", b"{\"a\":1}"));
    }

    fn threshold_event() -> Event {
        Event::new(
            EventKind::BudgetThreshold,
            "acme",
            "",
            "2026-12:monthly:0.8".into(),
            1_796_000_000_000,
        )
        .with("window", "monthly")
        .with("threshold_ppm", 800_000u64)
        .with("spent_nanousd", 80_000_000_000u64)
        .with("spent_usd", "80.000000000")
        .with("budget_usd", "100.000000000")
        .with("id", "not-this")
    }

    #[test]
    fn json_body_starts_with_the_contract_fields() {
        let e = threshold_event();
        let body = json_body(&e);
        let keys: Vec<&str> = body.keys().map(String::as_str).collect();
        assert_eq!(&keys[..5], ["id", "type", "at", "tenant", "key_id"]);
        assert_eq!(body["id"], e.id());
        assert_eq!(body["type"], "budget_threshold");
        assert!(body["at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(body["spent_nanousd"], 80_000_000_000u64);
        let bytes = render(WebhookFormat::Json, &body);
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back["tenant"], "acme");
    }

    #[test]
    fn slack_text_is_one_readable_line() {
        let body = json_body(&threshold_event());
        let t = slack_text(&body);
        assert!(
            t.contains("tenant `acme` has used 80 % of its monthly budget: $80.00 of $100.00"),
            "{t}"
        );
        let bytes = render(WebhookFormat::Slack, &body);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1);
        assert_eq!(v["text"], t);
        let circuit = json_body(
            &Event::new(EventKind::CircuitOpen, "", "", "p1:1".into(), 0)
                .with("provider", "openai")
                .with("node", "edge-1"),
        );
        assert!(
            slack_text(&circuit).contains("circuit of provider `openai` opened on node `edge-1`")
        );
    }

    #[test]
    fn slack_velocity_text_of_a_tenant_with_no_history_states_no_ratio() {
        let velocity = |ratio: &str, avg: &str| {
            json_body(
                &Event::new(EventKind::SpendVelocity, "acme", "", "h".into(), 0)
                    .with("spend_this_hour_usd", "60.000000000")
                    .with("hourly_avg_usd", avg)
                    .with("ratio", ratio),
            )
        };
        let t = slack_text(&velocity("inf", "0.000000000"));
        assert!(
            t.contains("tenant `acme` spent $60.00 this hour, with no spend in the trailing 24 h"),
            "{t}"
        );
        let t = slack_text(&velocity("12.0", "5.000000000"));
        assert!(
            t.contains("12.0x its trailing 24 h average of $5.00 an hour"),
            "{t}"
        );
    }
}
