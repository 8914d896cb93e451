//! Requests in flight, so a stopping gateway can exit as soon as the last one ends.
//!
//! Pingora 0.9.1 waits out its whole `grace_period_seconds` after SIGTERM (a plain
//! `thread::sleep` in `Server::run`, with no hook), so an idle gateway used to take
//! the full grace period to stop. Each client request holds an [`InFlight`] guard
//! for its life (in the proxy's context, dropped after the audit row is written);
//! [`wait_idle`] tells the shutdown path in `crate::shutdown` when none is left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::Notify;

/// A count of guards alive and a wake-up for when it drops to zero. One global
/// instance serves the process ([`InFlight::enter`]); tests make their own.
#[derive(Debug)]
pub struct Tracker {
    count: AtomicUsize,
    idle: Notify,
}

static GLOBAL: Tracker = Tracker::new();

impl Tracker {
    pub const fn new() -> Tracker {
        Tracker {
            count: AtomicUsize::new(0),
            idle: Notify::const_new(),
        }
    }

    /// Counts one more request until the returned guard is dropped.
    pub fn enter(&'static self) -> InFlight {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns `true` once no guard is alive, or `false` if some still are at
    /// `deadline`.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            // Registered before the count is read, so a drop to zero in between
            // still wakes this waiter.
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

/// One request in flight; counted until dropped.
#[derive(Debug)]
#[must_use = "the request is counted only while the guard lives"]
pub struct InFlight(&'static Tracker);

impl InFlight {
    /// Counts one request of the process until the guard is dropped.
    pub fn enter() -> InFlight {
        GLOBAL.enter()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Requests of the process in flight now.
pub fn count() -> usize {
    GLOBAL.count()
}

/// Waits until the process has no request in flight (`true`), or until `deadline`
/// with some still running (`false`).
pub async fn wait_idle(deadline: Instant) -> bool {
    GLOBAL.wait_idle(deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tracker() -> &'static Tracker {
        Box::leak(Box::new(Tracker::new()))
    }

    #[tokio::test]
    async fn idle_at_once_when_nothing_runs() {
        let t = tracker();
        let far = Instant::now() + Duration::from_secs(3600);
        assert!(t.wait_idle(far).await);
        let g = t.enter();
        drop(g);
        assert_eq!(t.count(), 0);
        assert!(t.wait_idle(far).await);
    }

    #[tokio::test]
    async fn waits_for_the_last_guard() {
        let t = tracker();
        let (a, b) = (t.enter(), t.enter());
        assert_eq!(t.count(), 2);
        let waiter = tokio::spawn(t.wait_idle(Instant::now() + Duration::from_secs(3600)));
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one request still runs");
        drop(b);
        assert!(waiter.await.unwrap_or(false));
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let t = tracker();
        let g = t.enter();
        assert!(!t.wait_idle(Instant::now()).await);
        drop(g);
    }
}
