//! `llm-gateway demo`: the mock provider plus a gateway on the embedded defaults.
//!
//! Needs no external service: counters in memory, audit rows to the local spool,
//! store tenants in a local SQLite file.

use crate::config::{Config, DEMO_YAML};
use crate::{mock, server};
use std::net::SocketAddr;
use std::process::ExitCode;

/// The address the embedded config expects the mock provider on.
const DEMO_MOCK_ADDR: &str = "127.0.0.1:18001";
pub const DEMO_KEY: &str = "sk-demo-key";
/// Admin token of the demo, unless `GATEWAY_ADMIN_TOKEN` is set.
pub const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";

fn set_default_env(name: &str, value: &str) {
    if std::env::var_os(name).is_none() {
        std::env::set_var(name, value);
    }
}

/// The embedded config as `serve` uses it without `--config`: the mock provider is
/// expected where the file says.
pub fn demo_yaml_for_serve() -> String {
    set_default_env("MOCK_OPENAI_KEY", "sk-mock-openai");
    set_default_env("MOCK_ANTHROPIC_KEY", "sk-mock-anthropic");
    set_default_env("GATEWAY_ADMIN_TOKEN", DEMO_ADMIN_TOKEN);
    DEMO_YAML.to_string()
}

fn start_mock() -> std::io::Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mock-provider".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let opts = mock::MockOptions {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    ttft_ms: 150,
                    gap_ms: 40,
                    tokens: 24,
                    tls: None,
                };
                match mock::spawn(opts).await {
                    Ok((addr, handle)) => {
                        let _ = tx.send(Ok(addr));
                        let _ = handle.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
    rx.recv()
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

pub fn run(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    let mock_addr = match start_mock() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: cannot start the mock provider: {e}");
            return ExitCode::from(1);
        }
    };
    let yaml = demo_yaml_for_serve()
        .replace(DEMO_MOCK_ADDR, &mock_addr.to_string())
        .replace("http: 127.0.0.1:8080", &format!("http: {listen}"))
        .replace("listen: 127.0.0.1:9090", &format!("listen: {admin}"));
    let cfg = match Config::from_yaml_str(&yaml) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo: embedded config is invalid:\n{e}");
            return ExitCode::from(1);
        }
    };
    print_instructions(listen, admin, mock_addr);
    server::run(cfg, server::RunOptions::default())
}

fn print_instructions(listen: SocketAddr, admin: SocketAddr, mock: SocketAddr) {
    let gw = format!("http://{listen}");
    println!(
        r#"
llm-gateway demo
  gateway  {gw}   (tenant "demo", API key {DEMO_KEY})
  admin    http://{admin}   (/healthz, /readyz, /metrics; /admin/* with 'Authorization: Bearer $GATEWAY_ADMIN_TOKEN', default {DEMO_ADMIN_TOKEN})
  mock     http://{mock}   (stands in for OpenAI, Anthropic and an in-house server)

Try:

  curl -s {gw}/v1/models -H 'Authorization: Bearer {DEMO_KEY}'

  curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \
    -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello"}}]}}'

  curl -sN {gw}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \
    -H 'content-type: application/json' \
    -d '{{"model":"llama-70b","stream":true,"messages":[{{"role":"user","content":"Stream to me"}}]}}'

  curl -s http://{admin}/admin/v1/providers -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}'

Onboard a tenant and issue it a key through the admin API (the key is shown once):

  curl -s -X POST http://{admin}/admin/v1/tenants -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' \
    -d '{{"id":"team-blue","models":["gpt-4o-mini","llama-70b"],"budget":{{"monthly_usd":10}}}}'

  curl -s -X POST http://{admin}/admin/v1/tenants/team-blue/keys -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' \
    -d '{{"name":"backend","rate":{{"rps":5}}}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])' \
    | xargs -I KEY curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer KEY' \
    -H 'content-type: application/json' -d '{{"messages":[{{"role":"user","content":"Hello from a new key"}}]}}'

  curl -s http://{admin}/admin/v1/tenants/team-blue/keys -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}'

  python3 -c 'from openai import OpenAI
c = OpenAI(base_url="{gw}/v1", api_key="{DEMO_KEY}")
for ch in c.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[{{"role":"user","content":"hi"}}]):
    print(ch.choices[0].delta.content or "", end="", flush=True)
print()'

Stop with Ctrl-C.
"#
    );
}
