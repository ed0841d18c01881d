//! The primary's lease from this member's side: acquiring, renewing and releasing it through
//! the replicated log, the deadline after which this member must not accept writes, and its
//! enforcement.
//!
//! The deadline is `send + ttl - margin` on the monotonic clock, where `send` is when the
//! acquisition or renewal that committed was sent (`pgwarden_core::lease`). A background task
//! renews every `ttl / 6` and, if the deadline passes without a committed renewal, stops
//! PostgreSQL at once (immediate shutdown). The deadline is also written to
//! `<state_dir>/lease.deadline` for the guard process (`guard.rs`), which enforces it when the
//! agent itself is dead.

use crate::agent::Shared;
use crate::raft::Applied;
use crate::sys;
use anyhow::{anyhow, bail, Result};
use pgwarden_core::lease::{Proposal, Rejected};
use pgwarden_core::lsn::Lsn;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default)]
struct Held {
    epoch: u64,
    /// Until when this member may accept writes (None: it holds no lease).
    deadline: Option<Instant>,
    /// Held on the two-node fencing arbiter (the peer was seen stopped), not committed.
    arbiter: bool,
}

pub struct LeaseKeeper {
    me: String,
    guard_file: PathBuf,
    data_dir: PathBuf,
    held: Mutex<Held>,
    /// The postmaster PID the enforcement stopped (so the loop does not count it as a crash).
    pub stopped_postgres: AtomicI32,
    /// The newest epoch this member gave up with a release: a renewal of it that was in flight
    /// and commits afterwards must not make this member a holder again.
    retired: AtomicU64,
    /// The newest epoch this agent held a committed lease of (since it started).
    held_max: AtomicU64,
}

impl LeaseKeeper {
    pub fn new(me: &str, state_dir: &str, data_dir: &str) -> LeaseKeeper {
        LeaseKeeper {
            me: me.into(),
            guard_file: PathBuf::from(state_dir).join("lease.deadline"),
            data_dir: PathBuf::from(data_dir),
            held: Mutex::new(Held::default()),
            stopped_postgres: AtomicI32::new(0),
            retired: AtomicU64::new(0),
            held_max: AtomicU64::new(0),
        }
    }

    pub fn guard_file(&self) -> &PathBuf {
        &self.guard_file
    }

    fn get(&self) -> Held {
        self.held.lock().map(|h| *h).unwrap_or_default()
    }

    /// The epoch of the lease this member holds now, if its deadline has not passed.
    pub fn holding(&self) -> Option<u64> {
        let h = self.get();
        h.deadline.filter(|d| Instant::now() < *d).map(|_| h.epoch)
    }

    /// How long this member may still accept writes.
    pub fn remaining(&self) -> Option<Duration> {
        self.get()
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Records a committed acquisition or renewal sent at `sent`.
    fn extend(&self, epoch: u64, sent: Instant, sent_mono_ms: u64, ttl_ms: u64, margin_ms: u64) {
        if epoch <= self.retired.load(Ordering::SeqCst) {
            return;
        }
        self.held_max.fetch_max(epoch, Ordering::SeqCst);
        let valid = Duration::from_millis(ttl_ms.saturating_sub(margin_ms));
        let new = sent + valid;
        let mono = pgwarden_core::lease::holder_deadline(sent_mono_ms, ttl_ms, margin_ms);
        let Ok(mut h) = self.held.lock() else {
            return;
        };
        if h.epoch != epoch {
            *h = Held {
                epoch,
                deadline: Some(new),
                arbiter: false,
            };
        } else if h.deadline.is_none_or(|d| new > d) || h.arbiter {
            h.deadline = Some(new.max(h.deadline.unwrap_or(new)));
            h.arbiter = false;
        } else {
            return;
        }
        drop(h);
        self.write_guard(mono);
    }

    /// Holds epoch `epoch` on the two-node fencing arbiter for `ttl - margin` from now: the
    /// peer's instance was seen stopped, so nobody else can write or commit a lease. Extended
    /// at every loop while the group cannot commit; replaced by the committed lease as soon as
    /// it can (see `elect::arbiter`).
    pub fn arbiter_hold(&self, epoch: u64, ttl_ms: u64, margin_ms: u64) {
        if epoch <= self.retired.load(Ordering::SeqCst) {
            return;
        }
        let valid = ttl_ms.saturating_sub(margin_ms);
        let Ok(mut h) = self.held.lock() else {
            return;
        };
        if h.epoch > epoch || (h.epoch == epoch && !h.arbiter && h.deadline.is_some()) {
            return;
        }
        *h = Held {
            epoch,
            deadline: Some(Instant::now() + Duration::from_millis(valid)),
            arbiter: true,
        };
        drop(h);
        self.write_guard(sys::monotonic_ms() + valid);
    }

    /// Whether this agent held a committed lease of `epoch` (or newer) since it started.
    pub fn held_since_start(&self, epoch: u64) -> bool {
        self.held_max.load(Ordering::SeqCst) >= epoch && epoch > 0
    }

    /// Whether this member holds its lease on the fencing arbiter (not committed).
    pub fn arbiter(&self) -> bool {
        let h = self.get();
        h.arbiter && h.deadline.is_some_and(|d| Instant::now() < d)
    }

    /// Gives up the local right to write (after PostgreSQL stopped, or when the lease is lost).
    pub fn forget(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.deadline = None;
            h.arbiter = false;
        }
        self.write_guard(0);
    }

    fn write_guard(&self, deadline_mono_ms: u64) {
        if let Err(e) = sys::write_atomic(&self.guard_file, &format!("{deadline_mono_ms}\n")) {
            tracing::error!(error = %format!("{e:#}"), "write the lease deadline for the guard");
        }
    }
}

fn rejected(r: Rejected) -> anyhow::Error {
    anyhow!("{r}")
}

/// Renews the lease this member holds on record. Errors when it is not committed.
pub async fn renew(shared: &Shared) -> Result<()> {
    let keeper = &shared.lease;
    let st = shared.consensus.sm.state();
    let Some(l) = st.lease.as_ref().filter(|l| l.holder == keeper.me) else {
        keeper.forget();
        bail!("this member does not hold the lease");
    };
    let f = st.config.failover;
    let lsn = shared.status().wal.write;
    let (sent, sent_mono) = (Instant::now(), sys::monotonic_ms());
    let p = Proposal::Renew {
        node: keeper.me.clone(),
        epoch: l.epoch,
        now_ms: sys::now_ms(),
        ttl_ms: f.ttl_ms(),
        lsn,
    };
    // Waiting past the deadline is useless: the renewal would not be trusted anyway.
    let limit = keeper
        .remaining()
        .unwrap_or(Duration::from_millis(f.ttl_ms() / 2))
        .max(Duration::from_millis(100));
    match tokio::time::timeout(limit, shared.consensus.propose(p)).await {
        Ok(Ok(Applied(Ok(())))) => {
            keeper.extend(l.epoch, sent, sent_mono, f.ttl_ms(), f.margin_ms());
            Ok(())
        }
        Ok(Ok(Applied(Err(r)))) => {
            // Refused: another epoch began, or the lease ran out. It is gone for good.
            keeper.forget();
            Err(rejected(r))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("the renewal was not committed within {limit:?}"),
    }
}

/// Takes the lease (epoch + 1). `manual` is an operator's failover (allowed while paused).
pub async fn acquire(
    shared: &Shared,
    reason: &str,
    manual: bool,
    record: Option<pgwarden_core::record::FailoverRecord>,
) -> Result<u64> {
    let keeper = &shared.lease;
    let st = shared.consensus.sm.state();
    let f = st.config.failover;
    let epoch = st.epoch() + 1;
    let (sent, sent_mono) = (Instant::now(), sys::monotonic_ms());
    let p = Proposal::Acquire {
        node: keeper.me.clone(),
        epoch,
        now_ms: sys::now_ms(),
        ttl_ms: f.ttl_ms(),
        reason: reason.into(),
        manual,
        record: record.map(Box::new),
    };
    match shared.consensus.propose(p).await? {
        Applied(Ok(())) => {
            keeper.extend(epoch, sent, sent_mono, f.ttl_ms(), f.margin_ms());
            shared.events.record(
                "lease_acquired",
                format!("took the lease, epoch {epoch}: {reason}"),
            );
            Ok(epoch)
        }
        Applied(Err(r)) => Err(rejected(r)),
    }
}

/// Adds a step to the failover record of `epoch` (best effort: the record is for people).
pub async fn record_step(shared: &Shared, epoch: u64, step: &str, detail: String) {
    if shared.lease.arbiter() {
        // Nothing commits on the arbiter; the acquisition's record tells the story later.
        return;
    }
    let p = Proposal::RecordStep {
        epoch,
        step: pgwarden_core::record::Step {
            step: step.into(),
            at_ms: sys::now_ms(),
            by: shared.lease.me.clone(),
            detail,
        },
    };
    if let Err(e) = shared.consensus.propose(p).await {
        tracing::debug!(error = %format!("{e:#}"), "record a failover step");
    }
}

/// Gives the lease up. PostgreSQL must already be stopped (or not writable).
pub async fn release(
    shared: &Shared,
    lsn: Option<Lsn>,
    successor: Option<String>,
    why: &str,
) -> Result<()> {
    let keeper = &shared.lease;
    let st = shared.consensus.sm.state();
    let Some(l) = st.lease.as_ref().filter(|l| l.holder == keeper.me) else {
        keeper.forget();
        bail!("this member does not hold the lease");
    };
    keeper.retired.fetch_max(l.epoch, Ordering::SeqCst);
    keeper.forget();
    let p = Proposal::Release {
        node: keeper.me.clone(),
        epoch: l.epoch,
        lsn,
        successor: successor.clone(),
        now_ms: sys::now_ms(),
        reserve_ms: 2 * st.config.failover.ttl_ms(),
    };
    match shared.consensus.propose(p).await? {
        Applied(Ok(())) => {
            shared.events.record(
                "lease_released",
                format!("released the lease, epoch {}: {why}", l.epoch),
            );
            Ok(())
        }
        Applied(Err(r)) => Err(rejected(r)),
    }
}

/// Renews while this member holds the lease and enforces the deadline. Runs for the agent's
/// lifetime, independently of the main loop (which may be busy starting PostgreSQL).
pub async fn run(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        let f = shared.consensus.sm.state().config.failover;
        let interval = Duration::from_millis(f.renew_interval_ms().max(50));
        let next = Instant::now() + interval;
        let held = shared.lease.get();
        if let Some(deadline) = held.deadline {
            if held.arbiter && Instant::now() < deadline {
                // Extended by the agent loop (see `arbiter_hold`); nothing to renew.
                tokio::time::sleep_until(next.min(deadline).into()).await;
                continue;
            }
            if Instant::now() >= deadline {
                // The VIP goes first; netlink answers in well under a millisecond, and the
                // stop does not wait longer than this for it.
                crate::endpoints::drop_local(
                    &shared,
                    "the lease ran out",
                    Duration::from_millis(50),
                )
                .await;
                enforce(&shared);
                continue;
            }
            let renewal = tokio::time::timeout_at(deadline.into(), renew(&shared)).await;
            match renewal {
                Ok(Ok(())) => {
                    if failures > 0 {
                        shared.events.record(
                            "lease_renewed",
                            format!("renewed the lease again after {failures} failed attempts"),
                        );
                    }
                    failures = 0;
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(error = %format!("{e:#}"), "lease renewal failed");
                    }
                }
                Err(_) => {
                    failures += 1;
                }
            }
            // Never sleep past the deadline.
            let wake = shared.lease.get().deadline.map_or(next, |d| next.min(d));
            tokio::time::sleep_until(wake.into()).await;
        } else {
            failures = 0;
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

/// The deadline passed without a committed renewal: stop accepting writes now.
fn enforce(shared: &Shared) {
    let keeper = &shared.lease;
    keeper.forget();
    let pid = shared.postmaster_pid.load(Ordering::Relaxed);
    let writable = !keeper.data_dir.join("standby.signal").exists();
    if pid > 0 && sys::pid_alive(pid) && writable {
        keeper.stopped_postgres.store(pid, Ordering::Relaxed);
        if let Err(e) = sys::signal(pid, libc::SIGQUIT) {
            tracing::error!(pid, error = %e, "stop PostgreSQL at the end of the lease");
        }
        shared.events.record(
            "lease_lost",
            "the lease could not be renewed before its deadline: PostgreSQL stopped \
             (immediate shutdown) so that it accepts no more writes",
        );
    } else {
        shared.events.record(
            "lease_lost",
            "the lease could not be renewed before its deadline",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_that_commits_after_a_release_does_not_revive_the_lease() {
        let dir = std::env::temp_dir().join(format!("pgwarden-lease-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = LeaseKeeper::new("n1", dir.to_str().unwrap(), "/nonexistent");
        let now = Instant::now();
        k.extend(3, now, sys::monotonic_ms(), 3000, 500);
        assert_eq!(k.holding(), Some(3));
        // The switchover releases epoch 3 while a renewal of it is in flight...
        k.retired.fetch_max(3, Ordering::SeqCst);
        k.forget();
        // ...and that renewal's success arrives afterwards.
        k.extend(3, Instant::now(), sys::monotonic_ms(), 3000, 500);
        assert_eq!(k.holding(), None, "a released epoch stays released");
        assert_eq!(std::fs::read_to_string(k.guard_file()).unwrap().trim(), "0");
        // A new acquisition (a newer epoch) is held normally.
        k.extend(5, Instant::now(), sys::monotonic_ms(), 3000, 500);
        assert_eq!(k.holding(), Some(5));
        // The end of a deadline (enforcement) does not retire: a late renewal of a lease that
        // never ran out in the replicated state may restore it.
        k.forget();
        k.extend(5, Instant::now(), sys::monotonic_ms(), 3000, 500);
        assert_eq!(k.holding(), Some(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
