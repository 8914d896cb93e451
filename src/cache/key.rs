//! Which requests may be answered from the cache, and the key they are stored under.
//!
//! Safety comes first: only a request that asks for determinism (an explicit
//! `temperature` of 0, one choice) is cacheable, and its key is a digest of everything
//! that can change the answer — the tenant, the endpoint (which fixes the wire format
//! stored), the whole model chain, the provider headers the client passes through and
//! the body with only `model` left out (the chain replaces it). The body is
//! canonicalised so that key order, whitespace and `1` vs `1.0` do not split entries,
//! and every component is framed by a type tag and a length so that no two different
//! requests can be spelled the same way.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What the client's `Cache-Control` request header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Read and write the cache.
    Normal,
    /// `no-cache`: do not read the cache, do refresh it.
    NoCache,
    /// `no-store`: neither read nor write.
    NoStore,
}

impl Directive {
    /// Parses a `Cache-Control` request header; `no-store` wins over `no-cache`.
    pub fn parse(header: Option<&str>) -> Directive {
        let Some(h) = header else {
            return Directive::Normal;
        };
        let mut out = Directive::Normal;
        for token in h.split(',') {
            let name = token.split('=').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("no-store") {
                return Directive::NoStore;
            }
            if name.eq_ignore_ascii_case("no-cache") {
                out = Directive::NoCache;
            }
        }
        out
    }
}

/// A request body asks for a deterministic answer: an explicit `temperature` of 0
/// (absent means the provider's default, which samples) and `n` absent or 1.
pub fn deterministic(body: &Map<String, Value>) -> bool {
    let zero_temperature = body
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let one_choice = match body.get("n") {
        None | Some(Value::Null) => true,
        Some(v) => v.as_f64() == Some(1.0),
    };
    zero_temperature && one_choice
}

/// Everything besides the body that the key covers.
pub struct KeyParts<'a> {
    pub tenant: &'a str,
    /// Bumped by a purge, so that fills still in flight when it ran are unreachable.
    pub generation: u64,
    pub endpoint: &'a str,
    /// `(public name, upstream name)` of every model of the chain, in order.
    pub chain: &'a [(&'a str, &'a str)],
    /// Request headers passed to providers that can change the answer
    /// (`anthropic-version`, `anthropic-beta`).
    pub headers: &'a [Option<&'a str>],
}

/// The 32-byte digest naming one cacheable request.
pub fn digest(parts: &KeyParts<'_>, body: &Map<String, Value>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"llmgw-cache-v1");
    str_(&mut h, parts.tenant);
    h.update(parts.generation.to_be_bytes());
    str_(&mut h, parts.endpoint);
    len(&mut h, parts.chain.len());
    for (public, upstream) in parts.chain {
        str_(&mut h, public);
        str_(&mut h, upstream);
    }
    len(&mut h, parts.headers.len());
    for v in parts.headers {
        match v {
            None => h.update(b"n"),
            Some(s) => {
                h.update(b"s");
                str_(&mut h, s);
            }
        }
    }
    let fields: Vec<(&String, &Value)> = body.iter().filter(|(k, _)| *k != "model").collect();
    object(&mut h, fields);
    h.finalize().into()
}

fn len(h: &mut Sha256, n: usize) {
    h.update((n as u64).to_be_bytes());
}

fn str_(h: &mut Sha256, s: &str) {
    len(h, s.len());
    h.update(s.as_bytes());
}

fn object(h: &mut Sha256, mut fields: Vec<(&String, &Value)>) {
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    h.update(b"{");
    len(h, fields.len());
    for (k, v) in fields {
        str_(h, k);
        value(h, v);
    }
}

/// Feeds one JSON value in canonical form: numbers that are whole are hashed as
/// integers whatever their spelling, so `1`, `1.0` and `1e0` are one key.
fn value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"z"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::String(s) => {
            h.update(b"s");
            str_(h, s);
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                h.update(b"i");
                h.update(i128::from(i).to_be_bytes());
            } else if let Some(u) = n.as_u64() {
                h.update(b"i");
                h.update(i128::from(u).to_be_bytes());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    h.update(b"i");
                    h.update((f as i128).to_be_bytes());
                } else {
                    h.update(b"d");
                    h.update(f.to_bits().to_be_bytes());
                }
            }
        }
        Value::Array(a) => {
            h.update(b"[");
            len(h, a.len());
            for x in a {
                value(h, x);
            }
        }
        Value::Object(m) => object(h, m.iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    const CHAIN: &[(&str, &str)] = &[("gpt-4o-mini", "gpt-4o-mini-2024-07-18")];

    fn parts(tenant: &str) -> KeyParts<'_> {
        KeyParts {
            tenant,
            generation: 0,
            endpoint: "chat_completions",
            chain: CHAIN,
            headers: &[None, None],
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn key_of(v: Value) -> [u8; 32] {
        digest(&parts("acme"), &obj(v))
    }

    fn base() -> Value {
        json!({
            "model": "gpt-4o-mini",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"}
            ]
        })
    }

    #[test]
    fn deterministic_needs_explicit_zero_temperature_and_one_choice() {
        assert!(deterministic(&obj(json!({"temperature": 0}))));
        assert!(deterministic(&obj(json!({"temperature": 0.0, "n": 1}))));
        assert!(deterministic(&obj(json!({"temperature": 0, "n": null}))));
        assert!(
            !deterministic(&obj(json!({}))),
            "absent temperature samples"
        );
        assert!(!deterministic(&obj(json!({"temperature": 0.2}))));
        assert!(!deterministic(&obj(json!({"temperature": "0"}))));
        assert!(!deterministic(&obj(json!({"temperature": null}))));
        assert!(!deterministic(&obj(json!({"temperature": 0, "n": 2}))));
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(Directive::parse(None), Directive::Normal);
        assert_eq!(Directive::parse(Some("max-age=0")), Directive::Normal);
        assert_eq!(Directive::parse(Some("no-cache")), Directive::NoCache);
        assert_eq!(Directive::parse(Some("No-Store")), Directive::NoStore);
        assert_eq!(
            Directive::parse(Some("no-cache, no-store")),
            Directive::NoStore
        );
        assert_eq!(
            Directive::parse(Some(" max-age=5 ,no-cache")),
            Directive::NoCache
        );
    }

    #[test]
    fn key_order_whitespace_and_number_spelling_do_not_matter() {
        let a = key_of(base());
        let text = r#"{ "messages" : [ {"content":"be brief","role":"system"},
            {"content":"hi", "role":"user"} ],
            "temperature": 0.0, "model":"other-name" }"#;
        let b: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            a,
            key_of(b),
            "reordered, respaced, 0.0 and another model field"
        );
        let mut c = base();
        c["max_tokens"] = json!(100);
        let mut d = base();
        d["max_tokens"] = json!(100.0);
        assert_eq!(key_of(c), key_of(d));
    }

    #[test]
    fn every_parameter_changes_the_key() {
        let a = key_of(base());
        let variants: Vec<(&str, Value)> = vec![
            ("top_p", json!(0.5)),
            ("max_tokens", json!(10)),
            ("max_completion_tokens", json!(10)),
            ("stop", json!(["\n"])),
            ("seed", json!(7)),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("auto")),
            ("response_format", json!({"type": "json_object"})),
            ("presence_penalty", json!(0.1)),
            ("frequency_penalty", json!(0.1)),
            ("logit_bias", json!({"50256": -100})),
            ("stream", json!(true)),
            ("stream_options", json!({"include_usage": true})),
            ("top_k", json!(3)),
            ("system", json!("other system")),
            ("n", json!(1)),
            ("user", json!("u1")),
        ];
        let mut seen = std::collections::HashSet::new();
        for (name, v) in variants {
            let mut b = base();
            b[name] = v;
            let k = key_of(b);
            assert_ne!(k, a, "{name} must change the key");
            assert!(seen.insert(k), "{name} collides with another variant");
        }
        let mut b = base();
        b["messages"][1]["content"] = json!("hi!");
        assert_ne!(key_of(b), a, "the user message");
        let mut b = base();
        b["messages"][0]["content"] = json!("be long");
        assert_ne!(key_of(b), a, "the system prompt");
        let mut b = base();
        b["temperature"] = json!(0.0001);
        assert_ne!(key_of(b), a);
    }

    #[test]
    fn context_outside_the_body_changes_the_key() {
        let body = obj(base());
        let a = digest(&parts("acme"), &body);
        let mut p = parts("acme");
        p.generation = 1;
        assert_ne!(digest(&p, &body), a, "generation (purge)");
        let mut p = parts("acme");
        p.endpoint = "messages";
        assert_ne!(digest(&p, &body), a, "endpoint");
        let chain = [
            ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
            ("llama", "llama"),
        ];
        let mut p = parts("acme");
        p.chain = &chain;
        assert_ne!(digest(&p, &body), a, "fallback chain");
        let mut p = parts("acme");
        p.headers = &[Some("2023-06-01"), None];
        assert_ne!(digest(&p, &body), a, "anthropic-version");
        assert_ne!(digest(&parts("globex"), &body), a, "tenant");
    }

    #[test]
    fn framing_is_unambiguous() {
        // The same characters split differently between tenant and endpoint.
        let body = obj(base());
        let mut p1 = parts("ab");
        p1.endpoint = "c";
        let mut p2 = parts("a");
        p2.endpoint = "bc";
        assert_ne!(digest(&p1, &body), digest(&p2, &body));
        let x = obj(json!({"a": "b", "c": "d"}));
        let y = obj(json!({"a": "b\u{0}c", "": "d"}));
        assert_ne!(digest(&parts("t"), &x), digest(&parts("t"), &y));
    }

    fn random_value(rng: &mut StdRng, depth: u32) -> Value {
        let pick = if depth == 0 {
            rng.random_range(0..4)
        } else {
            rng.random_range(0..6)
        };
        match pick {
            0 => Value::Null,
            1 => json!(rng.random_bool(0.5)),
            2 => json!(rng.random_range(-3i64..4)),
            3 => {
                let s: String = (0..rng.random_range(0..4))
                    .map(|_| ['a', 'b', '"', '\u{0}', 'é', 't'][rng.random_range(0..6)])
                    .collect();
                json!(s)
            }
            4 => Value::Array(
                (0..rng.random_range(0..3))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            _ => {
                let mut m = Map::new();
                for _ in 0..rng.random_range(0..3) {
                    let k = ["a", "b", "tenant", "content", ""][rng.random_range(0..5)];
                    m.insert(k.to_string(), random_value(rng, depth - 1));
                }
                Value::Object(m)
            }
        }
    }

    /// Whatever two tenants send, their keys never meet: over random bodies (including
    /// bodies that mention the other tenant), no key of one tenant is a key of the other.
    #[test]
    fn property_tenants_never_share_a_key() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut acme = std::collections::HashSet::new();
        let mut globex = std::collections::HashSet::new();
        for _ in 0..3000 {
            let mut body = Map::new();
            for _ in 0..rng.random_range(0..5) {
                let k = ["messages", "temperature", "tenant", "model", "x"][rng.random_range(0..5)];
                body.insert(k.to_string(), random_value(&mut rng, 3));
            }
            acme.insert(digest(&parts("acme"), &body));
            globex.insert(digest(&parts("globex"), &body));
        }
        assert!(acme.len() > 100, "the generator must produce varied bodies");
        assert!(acme.is_disjoint(&globex));
    }
}
