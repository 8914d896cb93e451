use crate::config::{sha256_hex, Config, ConfigError, WebhookFormat};

fn yaml(alerts: &str) -> String {
    format!(
        r#"
node: {{ region: r1 }}
listen: {{ http: 127.0.0.1:18080 }}
providers:
  p1: {{ kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }}
models:
  m1: {{ provider: p1, price: {{ input_per_mtok: 1, output_per_mtok: 2 }} }}
tenants:
  t1:
    api_keys: [ {{ id: k1, sha256: "{}" }} ]
    models: [m1]
{alerts}
"#,
        sha256_hex("sk-t1")
    )
}

fn errors_of(text: &str) -> Vec<ConfigError> {
    match Config::from_yaml_str(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

fn has(errors: &[ConfigError], path: &str, needle: &str) -> bool {
    errors
        .iter()
        .any(|e| e.path == path && e.message.contains(needle))
}

#[test]
fn absent_section_means_no_alerts() {
    let cfg = Config::from_yaml_str(&yaml("")).unwrap();
    assert!(cfg.alerts.is_none());
}

#[test]
fn full_section_reads_secret_format_and_thresholds() {
    std::env::set_var("ALERTS_CFGT_SECRET", "s3cret");
    let cfg = Config::from_yaml_str(&yaml(
        r#"alerts:
  webhooks:
    - { name: oncall, url: "https://hooks.example.com/llm-gateway", secret_env: ALERTS_CFGT_SECRET, format: json }
    - { name: chat, url: "http://127.0.0.1:9999/slack", format: slack }
  budget_thresholds: [1.0, 0.5, 0.8, 0.8]
  velocity: { factor: 5, min_hourly_usd: 10 }
"#,
    ))
    .unwrap();
    let a = cfg.alerts.unwrap();
    assert_eq!(a.webhooks.len(), 2);
    assert_eq!(a.webhooks[0].secret.as_deref(), Some("s3cret"));
    assert!(a.webhooks[0].url.tls);
    assert_eq!(a.webhooks[0].url.path_prefix, "/llm-gateway");
    assert_eq!(a.webhooks[1].format, WebhookFormat::Slack);
    assert_eq!(a.webhooks[1].secret, None);
    assert_eq!(a.budget_thresholds_ppm, vec![500_000, 800_000, 1_000_000]);
    assert_eq!(a.velocity.factor_milli, 5_000);
    assert_eq!(a.velocity.min_hourly_nanousd, 10_000_000_000);
}

#[test]
fn defaults_are_50_80_100_percent_and_velocity_5x_over_10_usd() {
    let cfg = Config::from_yaml_str(&yaml(
        "alerts:\n  webhooks: [ { name: a, url: \"http://127.0.0.1:1/\" } ]\n",
    ))
    .unwrap();
    let a = cfg.alerts.unwrap();
    assert_eq!(a.budget_thresholds_ppm, vec![500_000, 800_000, 1_000_000]);
    assert_eq!(a.velocity.factor_milli, 5_000);
    assert_eq!(a.webhooks[0].format, WebhookFormat::Json);
}

#[test]
fn errors_name_the_yaml_path() {
    let e = errors_of(&yaml(
        r#"alerts:
  webhooks:
    - { name: a, url: "ftp://x" }
    - { name: b, url: "http://x/", secret_env: ALERTS_CFGT_MISSING_VAR }
    - { name: c, url: "http://x/", format: teams }
    - { name: c, url: "http://x/" }
  budget_thresholds: [0.5, -1]
  velocity: { factor: 0, min_hourly_usd: -3 }
"#,
    ));
    assert!(has(&e, "alerts.webhooks[0].url", "scheme"), "{e:?}");
    assert!(
        has(
            &e,
            "alerts.webhooks[1].secret_env",
            "ALERTS_CFGT_MISSING_VAR"
        ),
        "{e:?}"
    );
    assert!(has(&e, "alerts.webhooks[2].format", "teams"), "{e:?}");
    assert!(has(&e, "alerts.webhooks[3].name", "twice"), "{e:?}");
    assert!(has(&e, "alerts.budget_thresholds[1]", "fraction"), "{e:?}");
    assert!(has(&e, "alerts.velocity.factor", "from 1"), "{e:?}");
    assert!(
        has(&e, "alerts.velocity.min_hourly_usd", "negative"),
        "{e:?}"
    );
}

#[test]
fn unknown_keys_are_errors() {
    let e = errors_of(&yaml(
        "alerts:\n  webhooks: [ { name: a, url: \"http://x/\", secrett: y } ]\n",
    ));
    assert!(e
        .iter()
        .any(|e| e.path.starts_with("alerts.webhooks") && e.message.contains("secrett")));
    let e = errors_of(&yaml("alerts:\n  thresholds: [0.5]\n"));
    assert!(e.iter().any(|e| e.message.contains("thresholds")), "{e:?}");
}
