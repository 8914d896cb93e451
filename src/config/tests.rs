use super::*;

const EXAMPLE: &str = include_str!("../../conf/gateway.example.yaml");

/// A valid file that needs no environment, for the bad-file tests to break one way.
const MINIMAL: &str = r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }
models:
  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  m2: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  t1:
    api_keys: [ { id: k1, sha256: "HASH1" } ]
    models: [m1]
"#;

fn minimal() -> String {
    MINIMAL.replace("HASH1", &sha256_hex("sk-t1"))
}

fn set_env(name: &str, value: &str) {
    std::env::set_var(name, value);
}

fn errors_of(yaml: &str) -> Vec<ConfigError> {
    match Config::from_yaml_str(yaml) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(e) => e.0,
    }
}

fn has_error(errors: &[ConfigError], path: &str, needle: &str) -> bool {
    errors
        .iter()
        .any(|e| e.path == path && e.message.contains(needle))
}

#[track_caller]
fn assert_error(yaml: &str, path: &str, needle: &str) -> Vec<ConfigError> {
    let errors = errors_of(yaml);
    assert!(
        has_error(&errors, path, needle),
        "no error at `{path}` containing `{needle}`; got:\n{}",
        ConfigErrors(errors.clone())
    );
    errors
}

#[test]
fn contract_example_parses_into_exact_values() {
    set_env("CFGT_GOOD_OPENAI", "sk-openai-test");
    set_env("CFGT_GOOD_ANTHROPIC", "sk-ant-test");
    set_env("CFGT_GOOD_CH", "ch-secret");
    set_env("CFGT_GOOD_ADMIN", "admin-secret");
    let yaml = EXAMPLE
        .replace("<64 hex>", &sha256_hex("sk-acme-test"))
        .replace("OPENAI_API_KEY", "CFGT_GOOD_OPENAI")
        .replace("ANTHROPIC_API_KEY", "CFGT_GOOD_ANTHROPIC")
        .replace("CLICKHOUSE_PASSWORD", "CFGT_GOOD_CH")
        .replace("GATEWAY_ADMIN_TOKEN", "CFGT_GOOD_ADMIN");
    let cfg = match Config::from_yaml_str(&yaml) {
        Ok(c) => c,
        Err(e) => panic!("example is invalid:\n{e}"),
    };

    assert_eq!(cfg.node.region, "us-east-1");
    assert!(!cfg.node.hostname.is_empty());
    assert_eq!(cfg.listen.http, Some("0.0.0.0:8080".parse().unwrap()));
    let https = cfg.listen.https.as_ref().unwrap();
    assert_eq!(https.addr, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(https.cert, PathBuf::from("/etc/llm-gateway/tls/cert.pem"));
    assert_eq!(cfg.admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(cfg.admin.token.as_deref(), Some("admin-secret"));
    assert_eq!(cfg.max_body_bytes, 4_194_304);

    let names: Vec<&str> = cfg.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["openai", "anthropic", "inhouse"]);
    let openai = cfg.provider("openai").unwrap();
    assert_eq!(openai.kind, ProviderKind::OpenAi);
    assert_eq!(openai.api_key.as_deref(), Some("sk-openai-test"));
    assert_eq!(
        openai.base_url,
        BaseUrl {
            tls: true,
            host: "api.openai.com".into(),
            port: 443,
            path_prefix: String::new(),
            original: "https://api.openai.com".into(),
        }
    );
    assert_eq!(openai.timeouts, Timeouts::default());
    assert!(openai.http2, "http2 defaults to auto");
    assert!(
        openai.stream_always,
        "upstream_streaming defaults to always"
    );
    let inhouse = cfg.provider("inhouse").unwrap();
    assert_eq!(inhouse.kind.as_str(), "openai_compatible");
    assert_eq!(inhouse.api_key, None);
    assert_eq!(inhouse.region, "eu-west-1");
    assert!(!inhouse.base_url.tls);
    assert_eq!(
        (inhouse.base_url.host.as_str(), inhouse.base_url.port),
        ("10.0.0.5", 8000)
    );

    let mini = cfg.model("gpt-4o-mini").unwrap();
    assert_eq!(mini.deployments[0].provider.name, "openai");
    assert_eq!(
        mini.price,
        Price {
            input_nanousd_per_mtok: 150_000_000,
            output_nanousd_per_mtok: 600_000_000,
            cached_input_nanousd_per_mtok: 75_000_000,
        }
    );
    assert_eq!(mini.max_output_tokens, Some(16384));
    let haiku = cfg.model("claude-haiku").unwrap();
    assert_eq!(
        haiku.deployments[0].upstream_model,
        "claude-3-5-haiku-20241022"
    );
    assert_eq!(haiku.price.output_nanousd_per_mtok, 4_000_000_000);
    assert_eq!(haiku.price.cached_input_nanousd_per_mtok, 800_000_000);
    let llama = cfg.model("llama-70b").unwrap();
    assert_eq!(llama.deployments[0].upstream_model, "llama-70b");
    assert_eq!(llama.price.input_nanousd_per_mtok, 100_000_000);
    assert!(Arc::ptr_eq(&llama.deployments[0].provider, inhouse));

    let acme = cfg.tenant("acme").unwrap();
    let allowed: Vec<&str> = acme.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(allowed, ["gpt-4o-mini", "claude-haiku", "llama-70b"]);
    assert_eq!(acme.pin_model.as_ref().unwrap().name, "gpt-4o-mini");
    let fallback: Vec<&str> = acme.fallback.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(fallback, ["claude-haiku", "llama-70b"]);
    assert!(acme.allow_fallback_override);
    assert_eq!(acme.region.as_deref(), Some("us-east-1"));
    assert_eq!(
        acme.rate,
        Rate {
            rps: Some(100),
            tpm: Some(2_000_000),
            concurrency: Some(64)
        }
    );
    assert_eq!(acme.budget.monthly_nanousd, Some(5_000_000_000_000));
    assert_eq!(acme.budget.hourly_nanousd, Some(400_000_000_000));
    assert_eq!(
        acme.cache,
        TenantCache {
            enabled: true,
            ttl_s: 3600
        }
    );
    assert_eq!(acme.api_keys[0].id, "acme-prod");

    assert_eq!(cfg.counters, Counters::Memory);
    assert_eq!(cfg.cache.max_bytes, 268_435_456);
    assert_eq!(cfg.audit.spool_dir, PathBuf::from("./data/spool"));
    let ch = cfg.audit.clickhouse.as_ref().unwrap();
    assert_eq!(ch.url, "http://127.0.0.1:8123");
    assert_eq!(
        (ch.database.as_str(), ch.table.as_str()),
        ("default", "llm_audit")
    );
    assert_eq!(ch.password.as_deref(), Some("ch-secret"));
    assert_eq!((ch.batch_rows, ch.flush_ms), (5000, 1000));

    // The TLS files do not exist here: that is a warning, not a refusal.
    assert!(cfg
        .warnings
        .iter()
        .any(|w| w.starts_with("listen.https.cert:")));

    let (tenant, key) = cfg.authenticate("sk-acme-test", 0).unwrap();
    assert_eq!((tenant.id.as_str(), key.id.as_str()), ("acme", "acme-prod"));
    assert!(cfg.authenticate("sk-acme-tes", 0).is_err());
    assert!(cfg.model("gpt-4").is_none() && cfg.tenant("nobody").is_none());
}

#[test]
fn example_as_shipped_refuses_the_placeholder_hash() {
    assert_error(EXAMPLE, "tenants.acme.api_keys[0].sha256", "64 hex");
}

#[test]
fn demo_yaml_loads_with_env_vars_set() {
    // What demo.rs rewrites must be in the file verbatim.
    for s in [
        "http: 127.0.0.1:8080",
        "listen: 127.0.0.1:9090",
        "127.0.0.1:18001",
    ] {
        assert!(DEMO_YAML.contains(s), "demo.yaml lost `{s}`");
    }
    set_env("CFGT_DEMO_OPENAI", "sk-mock-openai");
    set_env("CFGT_DEMO_ANTHROPIC", "sk-mock-anthropic");
    let yaml = DEMO_YAML
        .replace("MOCK_OPENAI_KEY", "CFGT_DEMO_OPENAI")
        .replace("MOCK_ANTHROPIC_KEY", "CFGT_DEMO_ANTHROPIC")
        .replace("GATEWAY_ADMIN_TOKEN", "CFGT_DEMO_ADMIN_UNSET");
    let cfg = match Config::from_yaml_str(&yaml) {
        Ok(c) => c,
        Err(e) => panic!("demo.yaml is invalid:\n{e}"),
    };
    assert_eq!(cfg.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(cfg.admin.token, None);
    assert!(cfg
        .warnings
        .iter()
        .any(|w| w.starts_with("admin.token_env:")));
    let inhouse = cfg.provider("mock-inhouse").unwrap();
    assert_eq!(inhouse.base_url.path_prefix, "/inhouse");
    assert_eq!(inhouse.region, "local-2");
    assert_eq!(
        cfg.model("claude-haiku").unwrap().deployments[0].upstream_model,
        "claude-3-5-haiku-20241022"
    );
    let (demo, key) = cfg.authenticate("sk-demo-key", 0).unwrap();
    assert_eq!((demo.id.as_str(), key.id.as_str()), ("demo", "demo-key"));
    assert_eq!(demo.models[0].name, "gpt-4o-mini");
    assert_eq!(demo.budget.monthly_nanousd, Some(100_000_000_000));
    assert_eq!(demo.rate.tpm, Some(1_000_000));
    assert_eq!(cfg.cache.max_bytes, 67_108_864);
}

#[test]
fn minimal_file_is_valid_and_keeps_file_order() {
    let yaml = minimal().replace("models: [m1]", "models: [m2, m1]");
    let cfg = Config::from_yaml_str(&yaml).unwrap();
    assert_eq!(cfg.tenants[0].models[0].name, "m2");
    assert_eq!(cfg.admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(cfg.counters, Counters::Memory);
    assert_eq!(
        cfg.tenants[0].cache,
        TenantCache {
            enabled: false,
            ttl_s: 300
        }
    );
    assert!(!cfg.tenants[0].allow_fallback_override);
}

#[test]
fn unknown_top_level_key_is_named() {
    let errors = assert_error(
        &format!("{}\nlisen: {{}}\n", minimal()),
        "lisen",
        "unknown field",
    );
    assert_eq!(errors.len(), 1);
}

#[test]
fn unknown_nested_key_is_named() {
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    rate: { rpz: 5 }");
    assert_error(&yaml, "tenants.t1.rate.rpz", "unknown field `rpz`");
    let yaml = minimal().replace(
        "region: r1 }\nmodels",
        "region: r1, timeout: { connect_ms: 1 } }\nmodels",
    );
    assert_error(&yaml, "providers.p1.timeout", "unknown field");
}

#[test]
fn wrong_type_is_named() {
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    rate: { rps: fast }");
    assert_error(&yaml, "tenants.t1.rate.rps", "invalid type");
    let yaml = minimal().replace(
        "listen: { http: 127.0.0.1:18080 }",
        "listen: { http: 8080 }",
    );
    assert_error(&yaml, "listen.http", "invalid type");
    let yaml = minimal().replace("kind: openai_compatible", "kind: openia");
    assert_error(&yaml, "providers.p1.kind", "unknown variant `openia`");
}

#[test]
fn unknown_model_in_tenant() {
    let yaml = minimal().replace("models: [m1]", "models: [m1, gpt-5]");
    assert_error(&yaml, "tenants.t1.models[1]", "unknown model `gpt-5`");
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    fallback: [m1, nope]");
    assert_error(&yaml, "tenants.t1.fallback[1]", "unknown model `nope`");
}

#[test]
fn pin_must_be_allowed() {
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    pin_model: m2");
    assert_error(&yaml, "tenants.t1.pin_model", "not in this tenant's models");
}

#[test]
fn fallback_outside_allowed_is_only_a_warning() {
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    fallback: [m2]");
    let cfg = Config::from_yaml_str(&yaml).unwrap();
    assert!(cfg
        .warnings
        .iter()
        .any(|w| w.starts_with("tenants.t1.fallback[0]:")));
    assert_eq!(cfg.tenants[0].fallback.len(), 1);
}

#[test]
fn bad_sha256() {
    let yaml = MINIMAL.replace("HASH1", "abc123");
    assert_error(&yaml, "tenants.t1.api_keys[0].sha256", "64 hex");
    let yaml = MINIMAL.replace("HASH1", &"zz".repeat(32));
    assert_error(&yaml, "tenants.t1.api_keys[0].sha256", "64 hex");
}

#[test]
fn same_key_in_two_tenants() {
    let yaml = format!(
        "{}  t2:\n    api_keys: [ {{ id: k1, sha256: \"{}\" }} ]\n    models: [m2]\n",
        minimal(),
        sha256_hex("sk-t1")
    );
    assert_error(
        &yaml,
        "tenants.t2.api_keys[0].sha256",
        "tenants.t1.api_keys[0].sha256",
    );
}

#[test]
fn duplicate_key_id_within_tenant() {
    let yaml = minimal().replace(
        "api_keys: [ {",
        &format!(
            "api_keys: [ {{ id: k1, sha256: \"{}\" }}, {{",
            sha256_hex("other")
        ),
    );
    assert_error(&yaml, "tenants.t1.api_keys[1].id", "already used");
}

#[test]
fn bad_base_url() {
    for url in [
        "ftp://host",
        "http://host/v1?x=1",
        "https://user:pw@host",
        "http://:80",
        "http://h:0",
        "http://h:99999",
    ] {
        let yaml = minimal().replace("http://127.0.0.1:9", url);
        assert_error(&yaml, "providers.p1.base_url", "not a usable base URL");
    }
}

#[test]
fn http2_auto_by_default_off_when_asked() {
    let cfg = Config::from_yaml_str(&minimal()).unwrap();
    assert!(cfg.provider("p1").unwrap().http2);
    let with = |v: &str| {
        minimal().replace(
            "region: r1 }\nmodels",
            &format!("region: r1, http2: {v} }}\nmodels"),
        )
    };
    let cfg = Config::from_yaml_str(&with("auto")).unwrap();
    assert!(cfg.provider("p1").unwrap().http2);
    let cfg = Config::from_yaml_str(&with("off")).unwrap();
    assert!(!cfg.provider("p1").unwrap().http2);
    for bad in ["on", "h2"] {
        assert_error(
            &with(bad),
            "providers.p1.http2",
            &format!("unknown variant `{bad}`, expected one of `auto`, `off`"),
        );
    }
    // A YAML boolean is not one of the words either.
    assert_error(&with("false"), "providers.p1.http2", "invalid type");
}

#[test]
fn upstream_streaming_always_by_default_as_client_when_asked() {
    let cfg = Config::from_yaml_str(&minimal()).unwrap();
    assert!(cfg.provider("p1").unwrap().stream_always);
    let with = |v: &str| {
        minimal().replace(
            "region: r1 }\nmodels",
            &format!("region: r1, upstream_streaming: {v} }}\nmodels"),
        )
    };
    let cfg = Config::from_yaml_str(&with("always")).unwrap();
    assert!(cfg.provider("p1").unwrap().stream_always);
    let cfg = Config::from_yaml_str(&with("as_client")).unwrap();
    assert!(!cfg.provider("p1").unwrap().stream_always);
    for bad in ["never", "as-client"] {
        assert_error(
            &with(bad),
            "providers.p1.upstream_streaming",
            &format!("unknown variant `{bad}`, expected one of `always`, `as_client`"),
        );
    }
    assert_error(
        &with("true"),
        "providers.p1.upstream_streaming",
        "invalid type",
    );
}

#[test]
fn base_url_forms() {
    let u = net::base_url("HTTPS://Gateway.Example.com:8443/openai/").unwrap();
    assert!(u.tls);
    assert_eq!(
        (u.host.as_str(), u.port, u.path_prefix.as_str()),
        ("gateway.example.com", 8443, "/openai")
    );
    let u = net::base_url("http://[::1]:8000").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.path_prefix.as_str()),
        ("[::1]", 8000, "")
    );
    assert_eq!(net::base_url("http://h/").unwrap().port, 80);
}

#[test]
fn missing_env_var() {
    let yaml = minimal().replace(
        "kind: openai_compatible,",
        "kind: openai, api_key_env: CFGT_NEVER_SET_4711,",
    );
    assert_error(
        &yaml,
        "providers.p1.api_key_env",
        "CFGT_NEVER_SET_4711 is not set",
    );
    let yaml = minimal().replace("kind: openai_compatible,", "kind: anthropic,");
    assert_error(&yaml, "providers.p1.api_key_env", "needs api_key_env");
}

#[test]
fn missing_listen() {
    let yaml = minimal().replace("listen: { http: 127.0.0.1:18080 }\n", "");
    assert_error(&yaml, "listen", "missing");
    let yaml = minimal().replace("listen: { http: 127.0.0.1:18080 }", "listen: {}");
    assert_error(&yaml, "listen", "at least one");
    let yaml = minimal().replace("127.0.0.1:18080", "localhost:8080");
    assert_error(&yaml, "listen.http", "not a socket address");
}

#[test]
fn redis_without_url() {
    let yaml = format!("{}counters: {{ backend: redis }}\n", minimal());
    assert_error(&yaml, "counters.url", "needs a url");
    let yaml = format!(
        "{}counters: {{ backend: redis, url: \"redis://10.0.0.1:6379\", on_error: fail_open }}\n",
        minimal()
    );
    let cfg = Config::from_yaml_str(&yaml).unwrap();
    assert_eq!(
        cfg.counters,
        Counters::Redis {
            url: "redis://10.0.0.1:6379".into(),
            on_error: OnError::FailOpen
        }
    );
}

#[test]
fn several_problems_are_all_reported_in_file_order() {
    let yaml = r#"
node: { region: r1 }
listen: { http: "nowhere" }
providers:
  p1: { kind: openai_compatible, base_url: "gopher://x", region: r1 }
  p2: { kind: openai_compatible, base_url: "http://x", region: r1, colour: blue }
models:
  m1: { provider: p1, price: { input_per_mtok: -1, output_per_mtok: 2 } }
  m2: { provider: p9, price: { input_per_mtok: 1, output_per_mtok: 2 } }
  m3: { provider: p2, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  t1:
    api_keys: []
    models: [m1, m4]
    rate: { rps: 0 }
counters: { backend: redis }
"#;
    let errors = errors_of(yaml);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "listen.http",
            "providers.p1.base_url",
            "providers.p2.colour",
            "models.m1.price.input_per_mtok",
            "models.m2.provider",
            "tenants.t1.api_keys",
            "tenants.t1.models[1]",
            "tenants.t1.rate.rps",
            "counters.url",
        ],
        "got:\n{}",
        ConfigErrors(errors.clone())
    );
    // m3 refers to the broken p2 and t1 to the broken m1: no cascade of "unknown" errors.
    let text = ConfigErrors(errors).to_string();
    assert_eq!(text.lines().count(), 9);
    assert!(text.contains("models.m2.provider: unknown provider `p9` (known: `p1`, `p2`)"));
}

#[test]
fn empty_or_broken_documents() {
    let errors = errors_of("");
    for section in ["node", "listen", "providers", "models", "tenants"] {
        assert!(has_error(&errors, section, "missing"), "{section}");
    }
    assert_error("node: [unclosed", "", "not valid YAML");
    assert_error("- a\n- b\n", "", "mapping of sections");
}

#[test]
fn region_pin_without_provider_warns() {
    let yaml = minimal().replace("models: [m1]", "models: [m1]\n    region: mars-1");
    let cfg = Config::from_yaml_str(&yaml).unwrap();
    assert!(cfg
        .warnings
        .iter()
        .any(|w| w.starts_with("tenants.t1.region:")));
}

#[test]
fn money_is_exact() {
    assert_eq!(usd_to_nanousd(0.15), Ok(150_000_000));
    assert_eq!(usd_to_nanousd(0.075), Ok(75_000_000));
    assert_eq!(usd_to_nanousd(0.6), Ok(600_000_000));
    assert_eq!(usd_to_nanousd(5000.0), Ok(5_000_000_000_000));
    assert_eq!(usd_to_nanousd(0.000000001), Ok(1));
    assert_eq!(usd_to_nanousd(0.0), Ok(0));
    assert_eq!(usd_to_nanousd(-0.0), Ok(0));
    assert!(usd_to_nanousd(0.1 + 0.2).is_err()); // 0.30000000000000004
    assert!(usd_to_nanousd(-1.0).is_err());
    assert!(usd_to_nanousd(f64::NAN).is_err());
    assert!(usd_to_nanousd(f64::INFINITY).is_err());
    assert!(usd_to_nanousd(1e30).is_err());
    assert_eq!(
        sha256_hex("sk-demo-key"),
        "82dae6d443609cfcb4e698af21391e5132c679ce83b37086ada791a0fb2a43ee"
    );
}

#[test]
fn config_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Config>();
    check::<ConfigErrors>();
}

#[test]
fn azure_openai_provider() {
    set_env("CFGT_AZURE_KEY", "azure-secret");
    let yaml = minimal().replace(
        "kind: openai_compatible, base_url: \"http://127.0.0.1:9\",",
        "kind: azure_openai, base_url: \"https://my-resource.openai.azure.com\", \
         api_version: \"2024-10-21\", api_key_env: CFGT_AZURE_KEY,",
    );
    let cfg = match Config::from_yaml_str(&yaml) {
        Ok(c) => c,
        Err(e) => panic!("azure provider refused:\n{e}"),
    };
    let p = &cfg.providers[0];
    assert_eq!(p.kind, ProviderKind::AzureOpenAi);
    assert_eq!(p.kind.as_str(), "azure_openai");
    assert_eq!(p.api_version.as_deref(), Some("2024-10-21"));
    assert_eq!(p.api_key.as_deref(), Some("azure-secret"));
    assert_eq!(p.base_url.host, "my-resource.openai.azure.com");
}

#[test]
fn azure_openai_api_version_errors() {
    set_env("CFGT_AZURE_KEY2", "azure-secret");
    let azure = |extra: &str| {
        minimal().replace(
            "kind: openai_compatible,",
            &format!("kind: azure_openai, api_key_env: CFGT_AZURE_KEY2,{extra}"),
        )
    };
    assert_error(&azure(""), "providers.p1.api_version", "needs api_version");
    assert_error(
        &azure(" api_version: \"2024-10-21&x=1\","),
        "providers.p1.api_version",
        "must be an Azure OpenAI API version",
    );
    assert_error(
        &azure(" api_version: \"\","),
        "providers.p1.api_version",
        "must be an Azure OpenAI API version",
    );
    // The key is required as for openai: Azure refuses requests without `api-key`.
    let yaml = minimal().replace(
        "kind: openai_compatible,",
        "kind: azure_openai, api_version: \"2024-10-21\",",
    );
    assert_error(&yaml, "providers.p1.api_key_env", "needs api_key_env");
    let yaml = minimal().replace(
        "kind: openai_compatible,",
        "kind: openai_compatible, api_version: \"2024-10-21\",",
    );
    assert_error(
        &yaml,
        "providers.p1.api_version",
        "only a provider of kind azure_openai",
    );
}

/// `minimal()` with model m1 given as `m1_yaml` (indented under `models:`), and a
/// second provider p2.
fn with_m1(m1_yaml: &str) -> String {
    minimal()
        .replace(
            "  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }\n",
            m1_yaml,
        )
        .replace(
            "models:\n",
            "  p2: { kind: openai_compatible, base_url: \"http://127.0.0.1:8\", region: r2 }\nmodels:\n",
        )
}

#[test]
fn deployments_parse_with_their_defaults_and_the_old_form_is_one() {
    let cfg = Config::from_yaml_str(&with_m1(
        "  m1:\n    deployments:\n      - { provider: p1, upstream_model: a, weight: 3, rpm: 100, tpm: 5000 }\n      - { provider: p2 }\n    balance: weighted\n    price: { input_per_mtok: 1, output_per_mtok: 2 }\n",
    ))
    .unwrap();
    let m = cfg.model("m1").unwrap();
    assert_eq!(m.balance, Balance::Weighted);
    let d: Vec<_> = m
        .deployments
        .iter()
        .map(|d| {
            (
                d.key.as_str(),
                d.provider.name.as_str(),
                d.upstream_model.as_str(),
                d.weight,
                d.rpm,
                d.tpm,
            )
        })
        .collect();
    assert_eq!(
        d,
        [
            ("p1/a", "p1", "a", 3, Some(100), Some(5000)),
            ("p2/m1", "p2", "m1", 1, None, None)
        ]
    );
    assert_eq!(m.upstream_names, "a,m1");
    assert!(m.serves_region("r2") && !m.serves_region("r3"));
    let old = cfg.model("m2").unwrap();
    assert_eq!(old.balance, Balance::LeastBusy);
    assert_eq!(old.deployments.len(), 1);
    assert_eq!(old.deployments[0].key, "p1/m2");
}

#[test]
fn bad_deployments_name_their_yaml_path() {
    let m1 = |body: &str| {
        with_m1(&format!(
            "  m1:\n{body}    price: {{ input_per_mtok: 1, output_per_mtok: 2 }}\n"
        ))
    };
    assert_error(
        &m1("    provider: p1\n    deployments: [ { provider: p2 } ]\n"),
        "models.m1.deployments",
        "not both",
    );
    assert_error(&m1(""), "models.m1.provider", "required");
    assert_error(
        &m1("    deployments: []\n"),
        "models.m1.deployments",
        "at least one",
    );
    assert_error(
        &m1("    upstream_model: x\n    deployments: [ { provider: p1 } ]\n"),
        "models.m1.upstream_model",
        "each entry",
    );
    assert_error(
        &m1("    deployments: [ { provider: p1 }, { provider: nope } ]\n"),
        "models.m1.deployments[1].provider",
        "unknown provider `nope`",
    );
    for (key, v) in [("weight", "0"), ("rpm", "0"), ("tpm", "0")] {
        assert_error(
            &m1(&format!(
                "    deployments: [ {{ provider: p1, {key}: {v} }} ]\n"
            )),
            &format!("models.m1.deployments[0].{key}"),
            "at least 1",
        );
    }
    assert_error(
        &m1("    deployments: [ { provider: p1, wieght: 2 } ]\n"),
        "models.m1.deployments[0].wieght",
        "unknown field `wieght`",
    );
    assert_error(
        &m1("    deployments: [ { provider: p1 }, { provider: p1, upstream_model: m1 } ]\n"),
        "models.m1.deployments[1]",
        "listed twice",
    );
    assert_error(
        &m1("    balance: fastest\n    deployments: [ { provider: p1 } ]\n"),
        "models.m1.balance",
        "expected one of `least_busy`, `weighted`, `lowest_latency`",
    );
    // One provider account's quota for one upstream model is one number.
    let shared = minimal().replace(
        "  m2: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }\n",
        "  m2:\n    deployments: [ { provider: p1, upstream_model: m1, rpm: 5 } ]\n    price: { input_per_mtok: 1, output_per_mtok: 2 }\n",
    );
    assert_error(&shared, "models.m2", "another rpm/tpm");
}
