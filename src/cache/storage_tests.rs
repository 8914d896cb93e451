use super::*;
use crate::providers::Completion;
use pingora_cache::trace::Span;

fn span() -> SpanHandle {
    Span::inactive().handle()
}

fn store(max_bytes: u64) -> &'static Store {
    Box::leak(Box::new(Store::new(max_bytes)))
}

fn meta() -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).unwrap();
    h.insert_header("content-type", "text/event-stream")
        .unwrap();
    let now = SystemTime::now();
    meta_of(
        now,
        now + std::time::Duration::from_secs(60),
        h,
        &Arc::new(Answer::new("gpt-4o-mini", "openai", "gpt-4o-mini")),
    )
}

fn key(name: &str, tenant: &str) -> CacheKey {
    CacheKey::new(name.as_bytes().to_vec(), tenant)
}

fn complete() -> Completion {
    Completion {
        complete: true,
        ..Completion::default()
    }
}

async fn fill(s: &'static Store, k: &CacheKey, body: &[u8], done: bool) -> MissHandler {
    let m = meta();
    let answer = m.extensions().get::<Arc<Answer>>().unwrap().clone();
    let mut w = s.get_miss_handler(k, &m, &span()).await.unwrap();
    w.write_body(Bytes::copy_from_slice(body), false)
        .await
        .unwrap();
    if done {
        answer.set_completion(complete());
    }
    w
}

async fn read_all(h: &mut HitHandler) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(b) = h.read_body().await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

#[tokio::test]
async fn complete_answers_are_stored_and_read_back() {
    let s = store(1 << 20);
    let k = key("a", "acme");
    assert!(s.lookup(&k, &span()).await.unwrap().is_none());
    let w = fill(s, &k, b"data: hello\n\n", true).await;
    w.finish().await.unwrap();
    let (m, mut h) = s.lookup(&k, &span()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut h).await.unwrap(), b"data: hello\n\n");
    let a = m.extensions().get::<Arc<Answer>>().unwrap();
    assert_eq!(a.model, "gpt-4o-mini");
    assert!(a.complete());
    assert_eq!(s.stats().entries, 1);
}

#[tokio::test]
async fn incomplete_or_abandoned_fills_are_not_stored() {
    let s = store(1 << 20);
    let k = key("cut", "acme");
    let w = fill(s, &k, b"data: partial\n\n", false).await;
    w.finish().await.unwrap();
    assert!(s.lookup(&k, &span()).await.unwrap().is_none(), "cut stream");
    let w = fill(s, &k, b"data: partial\n\n", true).await;
    drop(w);
    assert!(s.lookup(&k, &span()).await.unwrap().is_none(), "abandoned");
    assert_eq!(s.stats().discarded, 2);
    assert_eq!(s.stats().entries, 0);
}

#[tokio::test]
async fn another_tenant_never_reads_an_entry_even_under_the_same_hash() {
    let s = store(1 << 20);
    let mine = key("same", "acme");
    let theirs = key("same", "globex");
    assert_eq!(mine.combined_bin(), theirs.combined_bin());
    let w = fill(s, &mine, b"secret", true).await;
    assert!(
        s.lookup(&theirs, &span()).await.unwrap().is_none(),
        "in flight"
    );
    w.finish().await.unwrap();
    assert!(
        s.lookup(&theirs, &span()).await.unwrap().is_none(),
        "committed"
    );
    assert!(s.lookup(&mine, &span()).await.unwrap().is_some());
}

#[tokio::test]
async fn readers_follow_a_fill_as_it_is_written() {
    let s = store(1 << 20);
    let k = key("live", "acme");
    let m = meta();
    let answer = m.extensions().get::<Arc<Answer>>().unwrap().clone();
    let mut w = s.get_miss_handler(&k, &m, &span()).await.unwrap();
    let (_, mut reader) = s.lookup(&k, &span()).await.unwrap().unwrap();
    let task = tokio::spawn(async move { read_all(&mut reader).await });
    for part in [&b"data: 1\n\n"[..], b"data: 2\n\n", b"data: [DONE]\n\n"] {
        w.write_body(Bytes::from_static(part), false).await.unwrap();
        tokio::task::yield_now().await;
    }
    answer.set_completion(complete());
    w.finish().await.unwrap();
    let got = task.await.unwrap().unwrap();
    assert_eq!(got, b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n");
}

#[tokio::test]
async fn readers_of_an_abandoned_fill_get_an_error() {
    let s = store(1 << 20);
    let k = key("gone", "acme");
    let w = fill(s, &k, b"data: 1\n\n", false).await;
    let (_, mut reader) = s.lookup(&k, &span()).await.unwrap().unwrap();
    drop(w);
    assert!(read_all(&mut reader).await.is_err());
}

#[tokio::test]
async fn memory_stays_within_max_bytes_under_overfill() {
    let max = 64 * 1024;
    let s = store(max);
    let body = vec![b'x'; 1000];
    for i in 0..500 {
        let k = key(&format!("k{i}"), "acme");
        fill(s, &k, &body, true).await.finish().await.unwrap();
        assert!(
            s.stats().bytes as u64 <= max,
            "after {i} fills: {:?}",
            s.stats()
        );
    }
    let st = s.stats();
    assert!(st.evictions > 400, "{st:?}");
    assert!(st.entries > 10, "{st:?}");
    // The newest entry survives; the oldest is gone.
    assert!(s
        .lookup(&key("k499", "acme"), &span())
        .await
        .unwrap()
        .is_some());
    assert!(s
        .lookup(&key("k0", "acme"), &span())
        .await
        .unwrap()
        .is_none());
    // What the LRU forgot is gone from the maps too: every key is either both or neither.
    let mut found = 0;
    for i in 0..500 {
        if s.get(&key(&format!("k{i}"), "acme").combined_bin())
            .is_some()
        {
            found += 1;
        }
    }
    assert_eq!(found, s.stats().entries);
}

#[tokio::test]
async fn an_answer_larger_than_a_quarter_of_the_cache_is_not_stored() {
    let s = store(4000);
    let k = key("big", "acme");
    fill(s, &k, &vec![b'x'; 2000], true)
        .await
        .finish()
        .await
        .unwrap();
    assert!(s.lookup(&k, &span()).await.unwrap().is_none());
}

#[tokio::test]
async fn purge_drops_only_that_tenants_entries() {
    let s = store(1 << 20);
    for (name, tenant) in [("a", "acme"), ("b", "acme"), ("c", "globex")] {
        fill(s, &key(name, tenant), b"x", true)
            .await
            .finish()
            .await
            .unwrap();
    }
    assert_eq!(s.purge_tenant("acme"), 2);
    assert!(s
        .lookup(&key("a", "acme"), &span())
        .await
        .unwrap()
        .is_none());
    assert!(s
        .lookup(&key("c", "globex"), &span())
        .await
        .unwrap()
        .is_some());
    assert_eq!(s.stats().entries, 1);
}

#[tokio::test]
async fn expired_entries_are_reported_stale() {
    let s = store(1 << 20);
    let k = key("old", "acme");
    let mut h = ResponseHeader::build(200, None).unwrap();
    h.insert_header("content-type", "application/json").unwrap();
    let past = SystemTime::now() - std::time::Duration::from_secs(10);
    let answer = Arc::new(Answer::new("m", "p", "m"));
    let m = meta_of(past, past, h, &answer);
    let w = s.get_miss_handler(&k, &m, &span()).await.unwrap();
    answer.set_completion(complete());
    w.finish().await.unwrap();
    let (m, _) = s.lookup(&k, &span()).await.unwrap().unwrap();
    assert!(!m.is_fresh(SystemTime::now()));
}
