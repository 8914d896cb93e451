//! The shared (Redis) counter store against a real `redis-server`: two `Limits` on one
//! Redis stand for two edge nodes.
//!
//! Each test starts its own private `redis-server` on a free loopback port, with no
//! persistence, in a temporary directory. `redis-server` must be on PATH (Debian:
//! `apt-get install -y redis-server`; CI installs it): without it these tests fail,
//! they do not skip.

use crate::Proc;
use llm_gateway::config::{sha256_hex, ApiKey, Config, Counters, OnError, Tenant};
use llm_gateway::limits::{Actual, Demand, Limits, Refusal, Scope, Ticket};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A private redis-server, killed and its directory removed at the end.
pub(crate) struct Redis {
    proc: Option<Proc>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub(crate) fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("llmgw-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut r = Redis {
            proc: None,
            port,
            dir,
        };
        r.spawn();
        r
    }

    /// Starts (or restarts, on the same port) the server and waits for PING.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): these tests need it on PATH \
                     (Debian: apt-get install -y redis-server; CI installs it)"
                )
            });
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pings() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn kill(&mut self) {
        self.proc = None;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn counters(&self, on_error: OnError) -> Counters {
        Counters::Redis {
            url: self.url(),
            on_error,
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const TENANTS: &str = r#"
node: { region: r1 }
listen: { http: 127.0.0.1:18080 }
providers:
  p1: { kind: openai_compatible, base_url: "http://127.0.0.1:9", region: r1 }
models:
  m1: { provider: p1, price: { input_per_mtok: 1, output_per_mtok: 2 } }
tenants:
  budget37:
    api_keys: [ { id: k1, sha256: "H1" } ]
    models: [m1]
    budget: { monthly_usd: 0.000037 }
  rps50:
    api_keys: [ { id: k2, sha256: "H2" } ]
    models: [m1]
    rate: { rps: 50 }
  conc10:
    api_keys: [ { id: k3, sha256: "H3" } ]
    models: [m1]
    rate: { rps: 100000, tpm: 1000000, concurrency: 10 }
    budget: { monthly_usd: 1000, hourly_usd: 100 }
  conc1:
    api_keys: [ { id: k4, sha256: "H4" } ]
    models: [m1]
    rate: { concurrency: 1, tpm: 1000 }
  free:
    api_keys: [ { id: k5, sha256: "H5" } ]
    models: [m1]
  edges:
    api_keys: [ { id: k6, sha256: "H6" } ]
    models: [m1]
    budget: { monthly_usd: 0.00001, hourly_usd: 0.000004 }
  keyed:
    api_keys:
      - { id: "team/a", sha256: "H7", rate: { rps: 3 }, budget: { monthly_usd: 0.00001 } }
      - { id: plain, sha256: "H8" }
    models: [m1]
    budget: { monthly_usd: 0.000025 }
  mixed:
    api_keys:
      - { id: "team/a", sha256: "H9", budget: { monthly_usd: 0.00001 } }
      - { id: plain, sha256: "H10" }
    models: [m1]
    budget: { monthly_usd: 0.000025 }
  mixed2:
    api_keys:
      - { id: "team/a", sha256: "H11", budget: { monthly_usd: 0.00001 } }
      - { id: plain, sha256: "H12" }
    models: [m1]
    budget: { monthly_usd: 0.000025 }
  leased:
    api_keys:
      - { id: only, sha256: "H13", rate: { concurrency: 1, tpm: 1000 }, budget: { monthly_usd: 0.001 } }
    models: [m1]
"#;

fn tenants() -> Config {
    let mut yaml = TENANTS.to_string();
    let names = [
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m",
    ];
    for (i, key) in names.iter().enumerate() {
        yaml = yaml.replace(
            &format!("\"H{}\"", i + 1),
            &format!("\"{}\"", sha256_hex(key)),
        );
    }
    Config::from_yaml_str(&yaml).expect("test config")
}

fn tenant(cfg: &Config, id: &str) -> Arc<Tenant> {
    cfg.tenant(id).expect("tenant").clone()
}

/// A clock shared by both nodes, starting now; tests move it by hand.
pub(crate) fn clock() -> (Arc<AtomicU64>, llm_gateway::limits::Clock) {
    let now = Arc::new(AtomicU64::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64,
    ));
    let n = now.clone();
    (now, Arc::new(move || n.load(Ordering::SeqCst)))
}

fn two_nodes(redis: &Redis, on_error: OnError) -> (Arc<AtomicU64>, Limits, Limits) {
    let (now, clock) = clock();
    let conf = redis.counters(on_error);
    (
        now,
        Limits::with_clock(&conf, clock.clone()),
        Limits::with_clock(&conf, clock),
    )
}

/// The tenant's first key (in [`TENANTS`], one without limits of its own).
fn key0(t: &Tenant) -> &ApiKey {
    &t.api_keys[0]
}

fn demand(tokens: u64, cost: u64) -> Demand {
    Demand {
        tokens,
        cost_nanousd: cost,
    }
}

/// `n` concurrent admissions spread over both nodes; the admitted tickets.
async fn race(a: &Limits, b: &Limits, t: &Arc<Tenant>, n: usize, d: Demand) -> Vec<Ticket> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            let t = t.clone();
            tokio::spawn(async move { node.admit(&t, key0(&t), d).await })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        match task.await.expect("admit task") {
            Ok(k) => admitted.push(k),
            Err(Refusal::Unavailable(e)) => panic!("redis unavailable: {e}"),
            Err(_) => {}
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_never_together_exceed_one_monthly_budget() {
    let redis = Redis::start();
    let (_now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    let t = tenant(&cfg, "budget37");
    // Budget 37_000 nano-USD, each request may cost up to 1_000: exactly 37 fit.
    let held = race(&a, &b, &t, 200, demand(10, 1_000)).await;
    assert_eq!(held.len(), 37);
    match a.admit(&t, key0(&t), demand(1, 1)).await {
        Err(Refusal::Budget {
            which: "monthly",
            retry_after_s,
            ..
        }) => assert!(retry_after_s > 0 && retry_after_s <= 31 * 86_400),
        other => panic!("{other:?}"),
    }
    let u = b.usage(&t).await.expect("usage");
    assert_eq!(
        (u.reserved_nanousd, u.spent_nanousd, u.requests),
        (37_000, 0, 37)
    );
    // Settling at half the reservation frees room for 18 more, on either node.
    for k in held {
        a.settle(
            k,
            Actual {
                tokens_in: 5,
                tokens_out: 5,
                cost_nanousd: 500,
            },
        )
        .await;
    }
    let u = a.usage(&t).await.expect("usage");
    assert_eq!(
        (
            u.spent_nanousd,
            u.reserved_nanousd,
            u.tokens_in,
            u.tokens_out
        ),
        (18_500, 0, 185, 185)
    );
    assert_eq!(u.spent_usd, "0.000018500");
    assert_eq!(u.remaining_nanousd, Some(18_500));
    let more = race(&a, &b, &t, 100, demand(1, 1_000)).await;
    assert_eq!(more.len(), 18);
    assert_eq!(a.store_errors() + b.store_errors(), 0);
}

/// Redis's count of the commands it has run.
async fn commands_processed(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

/// Admits `cost` on `node`, settles it at the full cost, or returns the refusal.
async fn spend(node: &Limits, t: &Arc<Tenant>, cost: u64) -> Result<(), Refusal> {
    let k = node.admit(t, key0(t), demand(1, cost)).await?;
    node.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 0,
            cost_nanousd: cost,
        },
    )
    .await;
    Ok(())
}

fn budget_refusal(r: Result<(), Refusal>) -> (&'static str, u64) {
    match r {
        Err(Refusal::Budget {
            which,
            retry_after_s,
            ..
        }) => (which, retry_after_s),
        other => panic!("expected a budget refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hour_and_month_roll_over_on_the_injected_clock() {
    let redis = Redis::start();
    let (now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    // 10_000 nano-USD a month, 4_000 an hour.
    let t = tenant(&cfg, "edges");
    // 2026-11-30 23:30 UTC: half an hour before both the hour and the month roll.
    now.store(1_796_081_400_000, Ordering::SeqCst);
    spend(&a, &t, 3_000).await.expect("fits the hour");
    assert_eq!(budget_refusal(spend(&b, &t, 2_000).await), ("hourly", 1800));
    // 2026-12-01 00:00: a new hour and a new month, on either node.
    now.store(1_796_083_200_000, Ordering::SeqCst);
    spend(&b, &t, 4_000).await.expect("a fresh hour");
    let u = a.usage(&t).await.expect("usage");
    assert_eq!((u.month.as_str(), u.spent_nanousd), ("2026-12", 4_000));
    assert_eq!(u.spend_this_hour_nanousd, 4_000);
    assert_eq!(budget_refusal(spend(&a, &t, 1).await), ("hourly", 3600));
    // 01:00 and 02:00: the hours have room, the month runs out.
    now.fetch_add(3_600_000, Ordering::SeqCst);
    spend(&a, &t, 4_000).await.expect("fits hour and month");
    now.fetch_add(3_600_000, Ordering::SeqCst);
    // 8_000 spent + 4_000 > 10_000: refused until 2027-01-01 00:00, 30 days 22 h away.
    assert_eq!(
        budget_refusal(spend(&b, &t, 4_000).await),
        ("monthly", 2_671_200)
    );
    spend(&b, &t, 2_000).await.expect("the month's last 2_000");
    // 2027-01-01 00:00: a new month starts from nothing.
    now.store(1_798_761_600_000, Ordering::SeqCst);
    let u = b.usage(&t).await.expect("usage");
    assert_eq!((u.month.as_str(), u.spent_nanousd), ("2027-01", 0));
    spend(&a, &t, 4_000).await.expect("a fresh month");
    assert_eq!(a.store_errors() + b.store_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_enforce_one_rps_and_one_concurrency_limit() {
    let redis = Redis::start();
    let (now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    // The clock stands still: all 200 fall in one second.
    let t = tenant(&cfg, "rps50");
    let admitted = race(&a, &b, &t, 200, demand(1, 0)).await;
    assert_eq!(admitted.len(), 50);
    assert_eq!(admitted[0].headers.limit_requests, Some(50));
    match a.admit_request_only(&t, key0(&t)).await {
        Err(Refusal::Rate {
            scope: Scope::Tenant,
            which: "rps",
            retry_after_s: 1,
            headers,
        }) => {
            assert_eq!(headers.remaining_requests, Some(0))
        }
        other => panic!("{other:?}"),
    }
    // Node `b` admitted only half of them, but once Redis refused its request the
    // rest of this second is refused locally, before the body and without a round
    // trip: even with Redis gone the answer is the rps refusal, not "unavailable".
    assert!(matches!(
        b.admit(&t, key0(&t), demand(1, 0)).await,
        Err(Refusal::Rate { which: "rps", .. })
    ));
    let mut watch = redis.conn().await;
    let before = commands_processed(&mut watch).await;
    match b.precheck(&t, key0(&t)) {
        Err(Refusal::Rate {
            which: "rps",
            headers,
            ..
        }) => assert_eq!(headers.remaining_requests, Some(0)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        b.admit(&t, key0(&t), demand(1, 0)).await,
        Err(Refusal::Rate { which: "rps", .. })
    ));
    // Only the first INFO ran in between.
    assert_eq!(commands_processed(&mut watch).await, before + 1);
    drop(admitted);
    now.fetch_add(1000, Ordering::SeqCst);
    b.precheck(&t, key0(&t))
        .expect("a new second, asked of Redis again");
    let h = b
        .admit_request_only(&t, key0(&t))
        .await
        .expect("a new second");
    assert_eq!(h.remaining_requests, Some(49));

    let t = tenant(&cfg, "conc10");
    let mut held = race(&a, &b, &t, 200, demand(100, 1_000)).await;
    assert_eq!(held.len(), 10);
    assert_eq!(
        held[0]
            .headers
            .remaining_tokens
            .map(|r| r <= 1_000_000 - 100),
        Some(true)
    );
    assert!(matches!(
        a.admit(&t, key0(&t), demand(1, 1)).await,
        Err(Refusal::Rate {
            which: "concurrency",
            ..
        })
    ));
    // Ending a request on one node frees its slot for the other.
    let k = held.pop().expect("a ticket");
    a.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 1,
        },
    )
    .await;
    let k = b
        .admit(&t, key0(&t), demand(1, 1))
        .await
        .expect("the freed slot");
    held.push(k);
    assert!(b.admit(&t, key0(&t), demand(1, 1)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_beyond_double_precision_is_exact() {
    let redis = Redis::start();
    let (_now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    // 10^16 + 1 nano-USD: a double cannot tell it from 10^16.
    let mut t = Tenant::clone(&tenant(&cfg, "budget37"));
    t.budget.monthly_nanousd = Some(10_000_000_000_000_001);
    let t = Arc::new(t);
    let k = a
        .admit(&t, key0(&t), demand(1, 10_000_000_000_000_000))
        .await
        .expect("fits");
    a.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 10_000_000_000_000_000,
        },
    )
    .await;
    let k = b
        .admit(&t, key0(&t), demand(1, 1))
        .await
        .expect("the last nano-dollar fits");
    assert!(matches!(
        a.admit(&t, key0(&t), demand(1, 1)).await,
        Err(Refusal::Budget {
            which: "monthly",
            ..
        })
    ));
    b.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 1,
        },
    )
    .await;
    let u = a.usage(&t).await.expect("usage");
    assert_eq!(u.spent_nanousd, 10_000_000_000_000_001);
    assert_eq!(u.spent_usd, "10000000.000000001");
    assert_eq!(u.remaining_nanousd, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_key_expires_and_dropped_or_lost_tickets_are_given_back() {
    let redis = Redis::start();
    let (now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    let t = tenant(&cfg, "conc10");
    let k = a
        .admit(&t, key0(&t), demand(100, 1_000))
        .await
        .expect("admit");
    a.settle(
        k,
        Actual {
            tokens_in: 10,
            tokens_out: 20,
            cost_nanousd: 700,
        },
    )
    .await;
    assert_eq!(a.velocity(&t).await, Some((700, 0)));
    let u = b.usage(&t).await.expect("usage");
    assert_eq!(
        (u.spend_this_hour_nanousd, u.spend_hourly_avg_nanousd),
        (700, 0)
    );
    // A dropped ticket (a cancelled request) is released from a background task.
    let k = a
        .admit(&t, key0(&t), demand(100, 5_000))
        .await
        .expect("admit");
    let crashed = b
        .admit(&t, key0(&t), demand(100, 3_000))
        .await
        .expect("admit");
    assert_eq!(a.usage(&t).await.expect("usage").reserved_nanousd, 8_000);
    drop(k);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.usage(&t).await.expect("usage").reserved_nanousd != 3_000 {
        assert!(
            Instant::now() < deadline,
            "the dropped ticket was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut c = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("llmgw:*")
        .query_async(&mut c)
        .await
        .expect("KEYS");
    assert!(keys.len() >= 5, "{keys:?}");
    for key in &keys {
        assert!(
            key.starts_with("llmgw:{conc10}:"),
            "{key} is not in the tenant's slot"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("PTTL");
        // -2: gone already (a one-second rps key); -1 would be a key that never expires.
        assert!(ttl > 0 || ttl == -2, "{key} has no TTL ({ttl})");
        // Month keys live longest: the month plus a week.
        assert!(ttl <= 38 * 86_400_000, "{key}: {ttl} ms");
    }

    // Node b "crashes": its ticket is never settled nor renewed. Once the lease has
    // run out, the next admission on any node gives its reservation and slot back.
    std::mem::forget(crashed);
    now.fetch_add(61_000, Ordering::SeqCst);
    let k = a.admit(&t, key0(&t), demand(1, 1)).await.expect("admit");
    let u = a.usage(&t).await.expect("usage");
    assert_eq!((u.reserved_nanousd, u.spent_nanousd), (1, 700));
    a.settle(k, Actual::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_follows_on_error_and_recovers_without_a_restart() {
    let mut redis = Redis::start();
    let (_now, clock) = clock();
    let open = Limits::with_clock(&redis.counters(OnError::FailOpen), clock.clone());
    let closed = Limits::with_clock(&redis.counters(OnError::FailClosed), clock.clone());
    // A node that only ever serves a tenant with no limits: it never makes an
    // admission round trip, only settles.
    let idle = Limits::with_clock(&redis.counters(OnError::FailClosed), clock);
    let free = tenant(&tenants(), "free");
    let cfg = tenants();
    let t = tenant(&cfg, "conc10");
    let held = open
        .admit(&t, key0(&t), demand(10, 100))
        .await
        .expect("admit");
    let k = closed
        .admit(&t, key0(&t), demand(10, 100))
        .await
        .expect("admit");
    closed.settle(k, Actual::default()).await;

    redis.kill();
    for _ in 0..20 {
        let started = Instant::now();
        match closed.admit(&t, key0(&t), demand(10, 100)).await {
            Err(Refusal::Unavailable(_)) => {}
            other => panic!("fail_closed with redis down: {other:?}"),
        }
        let k = open
            .admit(&t, key0(&t), demand(10, 100))
            .await
            .expect("fail_open admits");
        open.settle(
            k,
            Actual {
                tokens_in: 1,
                tokens_out: 1,
                cost_nanousd: 50,
            },
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a dead redis stalled a request"
        );
    }
    // Nothing to enforce: admitted even by fail_closed, its spend kept for later.
    let k = idle
        .admit(&free, key0(&free), demand(10, 100))
        .await
        .expect("no limits");
    idle.settle(
        k,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 9,
        },
    )
    .await;
    // The request admitted before the outage ends during it.
    open.settle(
        held,
        Actual {
            tokens_in: 1,
            tokens_out: 1,
            cost_nanousd: 70,
        },
    )
    .await;
    assert!(closed.usage(&t).await.is_err());
    assert_eq!(closed.velocity(&t).await, None);
    // fail_open still holds each node to the tenant's concurrency on its own.
    let ten: Vec<Ticket> = {
        let mut v = Vec::new();
        while let Ok(k) = open.admit(&t, key0(&t), demand(1, 1)).await {
            v.push(k);
        }
        v
    };
    assert_eq!(ten.len(), 10);
    drop(ten);
    assert!(open.store_errors() > 0 && closed.store_errors() > 0);

    // Back on the same port (empty: no persistence): both recover on their own.
    redis.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let k = loop {
        match closed.admit(&t, key0(&t), demand(10, 100)).await {
            Ok(k) => break k,
            Err(Refusal::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("no recovery after redis came back: {other:?}"),
        }
    };
    closed
        .settle(
            k,
            Actual {
                tokens_in: 1,
                tokens_out: 1,
                cost_nanousd: 5,
            },
        )
        .await;
    // The spend settled during the outage was kept and is replayed once Redis is back:
    // 20 x 50 + 70 from the fail_open node, 5 from the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spent = closed.usage(&t).await.map(|u| u.spent_nanousd);
        if spent == Ok(1_075) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outage spend not replayed: {spent:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let u = closed
            .usage(&free)
            .await
            .map(|u| (u.spent_nanousd, u.requests));
        if u == Ok((9, 1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle node's outage spend was not replayed: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a Lua busy loop for `ms` on its own connection: Redis answers nobody else
/// meanwhile (a stand-in for a stalled or overloaded server).
async fn stall(redis: &Redis, ms: u64) -> tokio::task::JoinHandle<()> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut c = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to test redis");
    tokio::spawn(async move {
        let _: i64 = redis::cmd("EVAL")
            .arg(
                "local t = redis.call('TIME') \
                 local start = t[1] * 1000000 + t[2] \
                 repeat t = redis.call('TIME') \
                 until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000 \
                 return 0",
            )
            .arg(0)
            .arg(ms)
            .query_async(&mut c)
            .await
            .expect("busy script");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_redis_costs_a_bounded_wait_and_leaks_no_slot() {
    let redis = Redis::start();
    let (_now, clock) = clock();
    let l = Limits::with_clock(&redis.counters(OnError::FailClosed), clock);
    let cfg = tenants();
    let t = tenant(&cfg, "conc1");
    // Warm up: the connection is open and the scripts are loaded.
    let k = l.admit(&t, key0(&t), demand(10, 0)).await.expect("admit");
    l.settle(k, Actual::default()).await;

    let busy = stall(&redis, 700).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    match l.admit(&t, key0(&t), demand(10, 0)).await {
        Err(Refusal::Unavailable(_)) => {}
        other => panic!("admission during the stall: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a stalled redis held a request for {:?}",
        started.elapsed()
    );
    busy.await.expect("busy script task");
    // Redis did run the timed-out admission once it was free again (it counted the
    // request): that ticket holds the tenant's only slot and 10 tokens.
    // (The node may still be waiting to reconnect for a moment.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let u = loop {
        match l.usage(&t).await {
            Ok(u) => break u,
            Err(e) => assert!(Instant::now() < deadline, "no usage after the stall: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(u.requests, 2, "the stalled admission never ran");
    // The node gives both back by itself, rather than leaving them held until the
    // lease lapses a minute later.
    let deadline = Instant::now() + Duration::from_secs(5);
    let k = loop {
        match l.admit(&t, key0(&t), demand(10, 0)).await {
            Ok(k) => break k,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the slot taken by the timed-out admission leaked: {e:?}"),
        }
    };
    assert_eq!(k.headers.remaining_tokens, Some(990));
    l.settle(k, Actual::default()).await;
    let mut c = redis.conn().await;
    let leases: i64 = redis::cmd("ZCARD")
        .arg("llmgw:{conc1}:lease")
        .query_async(&mut c)
        .await
        .expect("ZCARD");
    assert_eq!(leases, 0);
    assert!(l.store_errors() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_whose_reply_was_lost_is_counted_once() {
    let redis = Redis::start();
    let (_now, clock) = clock();
    let l = Limits::with_clock(&redis.counters(OnError::FailClosed), clock);
    let cfg = tenants();
    let t = tenant(&cfg, "conc10");
    // Warm up: the scripts are loaded, so the settle below goes out as one EVALSHA.
    let k = l
        .admit(&t, key0(&t), demand(10, 1_000))
        .await
        .expect("admit");
    l.settle(k, Actual::default()).await;
    let k = l
        .admit(&t, key0(&t), demand(10, 1_000))
        .await
        .expect("admit");
    // Redis is busy for 700 ms: the settle times out after it was sent, Redis runs it
    // once free, and the node replays it (it cannot know it ran).
    let busy = stall(&redis, 700).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let errors = l.store_errors();
    l.settle(
        k,
        Actual {
            tokens_in: 3,
            tokens_out: 4,
            cost_nanousd: 700,
        },
    )
    .await;
    assert!(l.store_errors() > errors, "the settle did not time out");
    busy.await.expect("busy script task");
    // The replay runs within a second or two of Redis answering again; wait until
    // the node has no settle pending and no error since, then read the counters.
    let deadline = Instant::now() + Duration::from_secs(6);
    let u = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(u) = l.usage(&t).await {
            if u.reserved_nanousd == 0 && Instant::now() > deadline - Duration::from_secs(3) {
                break u;
            }
        }
        assert!(Instant::now() < deadline, "redis never answered again");
    };
    assert_eq!(
        (u.spent_nanousd, u.tokens_in, u.tokens_out, u.requests),
        (700, 3, 4, 2),
        "the replayed settle was counted twice"
    );
}

// ------------------------------------------------------------------ keys' own limits

/// `n` concurrent admissions spread over both nodes, alternating over `keys`: each
/// admitted ticket with the index of its key, and each refusal with the same.
async fn race_keys(
    a: &Limits,
    b: &Limits,
    t: &Arc<Tenant>,
    keys: &[Arc<ApiKey>],
    n: usize,
    d: Demand,
) -> (Vec<(usize, Ticket)>, Vec<(usize, Refusal)>) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let node = if (i / keys.len()).is_multiple_of(2) {
                a.clone()
            } else {
                b.clone()
            };
            let (t, k) = (t.clone(), i % keys.len());
            let key = keys[k].clone();
            tokio::spawn(async move { (k, node.admit(&t, &key, d).await) })
        })
        .collect();
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.expect("admit task") {
            (_, Err(Refusal::Unavailable(e))) => panic!("redis unavailable: {e}"),
            (k, Ok(ticket)) => admitted.push((k, ticket)),
            (k, Err(r)) => refused.push((k, r)),
        }
    }
    (admitted, refused)
}

fn keys_of(t: &Tenant) -> Vec<Arc<ApiKey>> {
    t.api_keys.clone()
}

async fn settle_all(node: &Limits, held: Vec<(usize, Ticket)>, cost: u64) {
    for (_, k) in held {
        node.settle(
            k,
            Actual {
                tokens_in: 1,
                tokens_out: 1,
                cost_nanousd: cost,
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_race_a_key_budget_and_its_tenant_budget_with_no_overshoot_at_either() {
    let redis = Redis::start();
    let (_now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    // The key `team/a` may reserve 10_000, the tenant 25_000; each request up to 1_000.
    let t = tenant(&cfg, "mixed");
    let keys = keys_of(&t);
    let team = &keys[0..1];

    // The key's budget binds: exactly 10 of 100 on that key alone, from both nodes.
    let (held, refused) = race_keys(&a, &b, &t, team, 100, demand(10, 1_000)).await;
    assert_eq!(held.len(), 10);
    for (_, r) in &refused {
        assert!(
            matches!(
                r,
                Refusal::Budget {
                    scope: Scope::Key,
                    which: "monthly",
                    ..
                }
            ),
            "{r:?}"
        );
    }
    // Then both keys race: the limited one gets nothing more, the other exactly what
    // is left of the tenant's budget.
    let (more, refused) = race_keys(&a, &b, &t, &keys, 100, demand(10, 1_000)).await;
    assert!(
        more.iter().all(|(k, _)| *k == 1),
        "the key's budget was overshot"
    );
    assert_eq!(more.len(), 15);
    // The plain key is refused by the tenant's budget; the other, once both are
    // full, by whichever scope is checked first (the tenant's).
    for (k, r) in &refused {
        assert!(
            matches!(r, Refusal::Budget { scope, .. } if *k == 0 || *scope == Scope::Tenant),
            "key {k}: {r:?}"
        );
    }
    let (u, ku) = (
        b.usage(&t).await.expect("usage"),
        a.key_usage(&t, &keys[0]).await.expect("key usage"),
    );
    assert_eq!((u.reserved_nanousd, u.requests), (25_000, 25));
    assert_eq!(
        (ku.reserved_nanousd, ku.requests, ku.tracked),
        (10_000, 10, true)
    );
    assert_eq!(ku.remaining_nanousd, Some(0));
    // Settled at 600 each, on the other node: both scopes get the spend.
    settle_all(&b, held, 600).await;
    settle_all(&a, more, 600).await;
    let (u, ku) = (
        a.usage(&t).await.expect("usage"),
        b.key_usage(&t, &keys[0]).await.expect("key usage"),
    );
    assert_eq!((u.spent_nanousd, u.reserved_nanousd), (15_000, 0));
    assert_eq!((ku.spent_nanousd, ku.reserved_nanousd), (6_000, 0));
    assert_eq!((ku.tokens_in, ku.tokens_out), (10, 10));
    assert_eq!(ku.remaining_usd.as_deref(), Some("0.000004000"));
    let plain = b.key_usage(&t, &keys[1]).await.expect("key usage");
    assert_eq!((plain.tracked, plain.requests), (false, 0));

    // Both at once from the start, on a fresh tenant: neither scope overshoots.
    let t = tenant(&cfg, "mixed2");
    let keys = keys_of(&t);
    let (held, _) = race_keys(&a, &b, &t, &keys, 200, demand(10, 1_000)).await;
    let on_team = held.iter().filter(|(k, _)| *k == 0).count();
    assert_eq!(held.len(), 25);
    assert!(on_team <= 10, "{on_team} admitted on a key that fits 10");
    settle_all(&a, held, 1_000).await;
    let (u, ku) = (
        b.usage(&t).await.expect("usage"),
        a.key_usage(&t, &keys[0]).await.expect("key usage"),
    );
    assert_eq!(u.spent_nanousd, 25_000);
    assert_eq!(ku.spent_nanousd, on_team as u64 * 1_000);
    assert_eq!(a.store_errors() + b.store_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rps_limit_holds_across_nodes_and_a_key_without_limits_has_no_redis_names() {
    let redis = Redis::start();
    let (now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    let t = tenant(&cfg, "keyed");
    let (team, plain) = (&t.api_keys[0], &t.api_keys[1]);
    // The plain key first: its requests leave names of the tenant only.
    for node in [&a, &b] {
        let k = node.admit(&t, plain, demand(5, 100)).await.expect("admit");
        node.settle(k, Actual::default()).await;
    }
    let mut c = redis.conn().await;
    let names = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("llmgw:*")
                .query_async(&mut c)
                .await
                .expect("KEYS");
            keys
        }
    };
    let before = names(&mut c).await;
    assert!(!before.is_empty());
    assert!(
        before.iter().all(|k| k.starts_with("llmgw:{keyed}:")),
        "{before:?}"
    );

    // Start at the beginning of a second, so the three fit into one.
    let ms = now.load(Ordering::SeqCst);
    now.store(ms - ms % 1000 + 1000, Ordering::SeqCst);
    for node in [&a, &b, &a] {
        let k = node.admit(&t, team, demand(5, 100)).await.expect("admit");
        node.settle(k, Actual::default()).await;
    }
    let r = b.admit(&t, team, demand(5, 100)).await.unwrap_err();
    match &r {
        Refusal::Rate {
            scope: Scope::Key,
            which: "rps",
            headers,
            ..
        } => assert_eq!(
            (headers.limit_requests, headers.remaining_requests),
            (Some(3), Some(0))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.message(),
        "rate limit exceeded for this API key: requests per second"
    );
    // Remembered by the node Redis refused: the rest of the second costs no round trip.
    assert!(matches!(
        b.precheck(&t, team),
        Err(Refusal::Rate {
            scope: Scope::Key,
            ..
        })
    ));
    // The tenant's other key is not limited by it.
    b.precheck(&t, plain).expect("the other key");
    let k = b.admit(&t, plain, demand(5, 100)).await.expect("other key");
    b.settle(k, Actual::default()).await;

    let after = names(&mut c).await;
    let own: Vec<_> = after
        .iter()
        .filter(|k| k.starts_with("llmgw:{keyed}/team/a:"))
        .collect();
    // Its second's rps counter and its month (its tickets are settled and gone).
    assert!(own.len() >= 2, "{after:?}");
    assert!(!after.iter().any(|k| k.contains("plain")), "{after:?}");
    for key in &after {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("PTTL");
        assert!(ttl > 0 || ttl == -2, "{key} has no TTL ({ttl})");
    }
    let ku = a.key_usage(&t, team).await.expect("key usage");
    assert_eq!(ku.requests, 3);
    let u = a.usage(&t).await.expect("usage");
    assert_eq!(u.requests, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_nodes_ticket_is_reclaimed_in_the_key_scope_too() {
    let redis = Redis::start();
    let (now, a, b) = two_nodes(&redis, OnError::FailClosed);
    let cfg = tenants();
    let t = tenant(&cfg, "leased");
    let key = &t.api_keys[0];
    let crashed = b.admit(&t, key, demand(600, 3_000)).await.expect("admit");
    match a.admit(&t, key, demand(100, 1_000)).await {
        Err(Refusal::Rate {
            scope: Scope::Key,
            which: "concurrency",
            headers,
            ..
        }) => assert_eq!(headers.remaining_tokens, Some(400)),
        other => panic!("{other:?}"),
    }
    // Never settled nor renewed: once its lease is over, the next admission gives its
    // slot, tokens and reservation back in both scopes.
    std::mem::forget(crashed);
    now.fetch_add(61_000, Ordering::SeqCst);
    let k = a
        .admit(&t, key, demand(100, 1_000))
        .await
        .expect("reclaimed");
    assert_eq!(k.headers.remaining_tokens, Some(900));
    let (u, ku) = (
        a.usage(&t).await.expect("usage"),
        b.key_usage(&t, key).await.expect("key usage"),
    );
    assert_eq!((u.reserved_nanousd, ku.reserved_nanousd), (1_000, 1_000));
    a.settle(
        k,
        Actual {
            tokens_in: 3,
            tokens_out: 4,
            cost_nanousd: 700,
        },
    )
    .await;
    let ku = b.key_usage(&t, key).await.expect("key usage");
    assert_eq!(
        (ku.spent_nanousd, ku.reserved_nanousd, ku.tokens_out),
        (700, 0, 4)
    );
    // A demand above the key's tokens per minute is refused without asking Redis.
    let mut c = redis.conn().await;
    let before = commands_processed(&mut c).await;
    assert!(matches!(
        a.admit(&t, key, demand(1_001, 1)).await,
        Err(Refusal::NeverFits {
            scope: Scope::Key,
            which: "tpm",
            demand: 1_001,
            limit: 1_000,
        })
    ));
    // Only the INFO itself ran in between.
    assert_eq!(commands_processed(&mut c).await, before + 1);
}
