//! The command line as operators use it.

use crate::bin;
use std::process::Command;

fn check_config(path: &str, envs: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(bin())
        .args(["check-config", "--config", path])
        .envs(envs.iter().copied())
        .output()
        .expect("run check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn shipped_demo_config_is_valid() {
    let (ok, text) = check_config(
        concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml"),
        &[("MOCK_OPENAI_KEY", "x"), ("MOCK_ANTHROPIC_KEY", "y")],
    );
    assert!(ok, "{text}");
}

#[test]
fn missing_provider_key_env_is_reported_with_its_path() {
    let (ok, text) = check_config(
        concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml"),
        &[("MOCK_OPENAI_KEY", "x"), ("MOCK_ANTHROPIC_KEY", "")],
    );
    assert!(!ok);
    assert!(
        text.contains("providers.mock-anthropic.api_key_env"),
        "{text}"
    );
}

#[test]
fn every_problem_of_a_bad_file_is_printed() {
    let dir = std::env::temp_dir().join(format!("llmgw-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "ftp://x", region: r1 }
models:
  m1: { provider: nope, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  t1:
    api_keys: [ { id: k1, sha256: "abc" } ]
    models: [m1]
  t2:
    api_keys: [ { id: k2, sha256: "abc" } ]
    models: [m1]
    rate: { rpz: 3 }
"#,
    )
    .unwrap();
    let (ok, text) = check_config(path.to_str().unwrap(), &[]);
    assert!(!ok);
    for p in [
        "providers.p1.base_url",
        "models.m1.provider",
        "tenants.t1.api_keys[0].sha256",
        "tenants.t2.rate.rpz",
    ] {
        assert!(text.contains(p), "missing {p} in:\n{text}");
    }
}

#[test]
fn hash_key_prints_sha256_hex() {
    let out = Command::new(bin())
        .args(["hash-key", "sk-test"])
        .output()
        .expect("run hash-key");
    assert!(out.status.success());
    // `printf 'sk-test' | sha256sum`
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "f3abf2a6cc4f00987743db5f544ba345b4899ae31f326d8ee9c4816de153c9e0"
    );
}
