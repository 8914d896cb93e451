//! The store's background task: keeps this node's state current and the snapshot
//! written.
//!
//! A version poll every `sync_ms` is the guarantee; on Postgres a `LISTEN` connection
//! makes changes arrive in milliseconds instead, and the poll only catches what a
//! lost notification or a reconnect missed. The snapshot is written off the async
//! workers, at most once a second, after the state changed.

use super::db::{Db, CHANNEL};
use super::Store;
use futures_util::StreamExt;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct StoreSync(pub Arc<Store>);

const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

#[async_trait::async_trait]
impl BackgroundService for StoreSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = self.0.clone();
        if let Db::Postgres(_) = store.db() {
            let listener = store.clone();
            tokio::spawn(async move { listen(listener).await });
        }
        let period = Duration::from_millis(store.conf().sync_ms);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_snapshot = Instant::now() - SNAPSHOT_EVERY;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = store.wake.notified() => {}
                _ = shutdown.changed() => {
                    write_snapshot(&store).await;
                    return;
                }
            }
            if store.health().loaded {
                let _ = store.sync_now().await;
            } else if store
                .initial_load(period.max(Duration::from_secs(1)))
                .await
                .is_ok()
            {
                // Started without the database and without a usable snapshot: the
                // first successful load (migrations included) makes the node ready.
                log::info!("store: loaded after a start without the database");
            }
            if last_snapshot.elapsed() >= SNAPSHOT_EVERY {
                last_snapshot = Instant::now();
                // Not awaited: writing (and fsyncing) 100,000 tenants must not hold up
                // the next change.
                if !WRITING.swap(true, Ordering::AcqRel) {
                    let s = store.clone();
                    tokio::spawn(async move {
                        write_snapshot(&s).await;
                        WRITING.store(false, Ordering::Release);
                    });
                }
            }
        }
    }
}

/// One snapshot write at a time (a process runs one store).
static WRITING: AtomicBool = AtomicBool::new(false);

async fn write_snapshot(store: &Arc<Store>) {
    let Some(path) = store.conf().snapshot.clone() else {
        return;
    };
    let s = store.clone();
    let r = tokio::task::spawn_blocking(move || match s.take_snapshot_state() {
        Some(state) => super::snapshot::write(&path, &state),
        None => Ok(()),
    })
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::error!("store: cannot write the snapshot: {e}"),
        Err(e) => log::error!("store: snapshot task failed: {e}"),
    }
}

/// Holds a `LISTEN` connection and wakes the sync task on every notification;
/// reconnects with backoff when the connection is lost.
async fn listen(store: Arc<Store>) {
    let Db::Postgres(target) = store.db().clone() else {
        return;
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        if let Ok((client, mut connection)) = target.config.connect(tokio_postgres::NoTls).await {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                            let _ = tx.send(());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .is_ok()
            {
                backoff = Duration::from_millis(200);
                // A change made while this connection was down: look now.
                store.wake.notify_one();
                while rx.recv().await.is_some() {
                    store.wake.notify_one();
                }
            }
            driver.abort();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
