//! What this member does about the lease, and the role that follows from it: pure functions of
//! the replicated state, this member's clocks and what it sees of the others.
//!
//! - `next_move`: renew, acquire, release, or wait — and why.
//! - `intent`: the lease holder is the primary; everyone else follows the holder; a member
//!   that lost its lease and sees no new holder runs as a standby without an upstream (read
//!   only, never writable), so it stays a candidate when the others cannot take over.

use crate::candidate::{choose, verdict, Candidate, Rules, Verdict};
use crate::lease::ClusterState;
use crate::record::{CandidateRecord, ChangeKind, FailoverRecord, Step};
use crate::status::Intent;

/// What one member knows when it decides.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub me: &'a str,
    pub state: &'a ClusterState,
    /// This member's wall clock (ms since the epoch).
    pub now_ms: u64,
    /// This member holds a committed lease whose deadline (its monotonic clock) has not passed.
    pub holding: bool,
    /// Every member that runs PostgreSQL, this one included, as seen now.
    pub candidates: &'a [Candidate],
    pub initial_primary: &'a str,
    /// This member's PostgreSQL runs as a writable primary.
    pub local_primary_running: bool,
    /// For how long this member's PostgreSQL has not been running (None: it runs).
    pub pg_down_ms: Option<u64>,
    /// Some other member already has a PostgreSQL cluster (so this one must not initdb).
    pub peer_has_cluster: bool,
    /// This member runs its primary under a lease of the two-node fencing arbiter (not yet
    /// committed in the group).
    pub arbiter_holding: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    Nothing,
    /// Renew now (this member is the holder on record but has no running deadline, e.g. after
    /// an agent restart).
    Renew,
    Acquire {
        reason: String,
    },
    /// Give the lease up so that another member takes over.
    Release {
        reason: String,
    },
    /// Nothing this member can do; the reason is shown in its status.
    Wait(String),
}

/// The failover rules for the current state.
/// In synchronous mode only members of the committed synchronous set may be promoted (`on`
/// degraded to an empty set falls back to the lag limit; `strict` never does).
pub fn rules(state: &ClusterState) -> Rules {
    use crate::dynconfig::SyncMode;
    let sync_set = match state.config.failover.synchronous_mode {
        SyncMode::Off => None,
        SyncMode::On if state.sync.is_empty() => None,
        SyncMode::On | SyncMode::Strict => Some(state.sync.clone()),
    };
    Rules {
        maximum_lag_on_failover: state.config.failover.maximum_lag_on_failover,
        primary_lsn: state.lease.as_ref().and_then(|l| l.last_lsn),
        sync_set,
    }
}

pub fn next_move(i: &Inputs) -> Move {
    let st = i.state;
    let f = st.config.failover;
    let drift = f.drift_ms();
    if let Some(l) = &st.lease {
        let valid = !l.released && i.now_ms < l.expires_at_ms;
        if valid && l.holder == i.me {
            let broken = i
                .pg_down_ms
                .is_some_and(|d| d > f.primary_start_timeout.0.as_millis() as u64);
            if broken && !st.paused {
                let others: Vec<Candidate> = i
                    .candidates
                    .iter()
                    .filter(|c| c.name != i.me)
                    .cloned()
                    .collect();
                if let Some(c) = choose(&others, &rules(st)) {
                    return Move::Release {
                        reason: format!(
                            "PostgreSQL could not be restarted within primary_start_timeout \
                             ({}); {} can take over",
                            f.primary_start_timeout, c.name
                        ),
                    };
                }
            }
            return if i.holding {
                Move::Nothing
            } else {
                Move::Renew
            };
        }
        if !st.acquirable(i.now_ms, drift) {
            return Move::Nothing;
        }
        if l.released && i.now_ms < l.reserved_until_ms {
            if let Some(s) = &l.successor {
                if s != i.me {
                    return Move::Wait(format!(
                        "the lease is reserved for {s} (a switchover from {})",
                        l.holder
                    ));
                }
                let me = i.candidates.iter().find(|c| c.name == i.me);
                let caught_up = match (l.last_lsn, me.and_then(|c| c.received_lsn)) {
                    (Some(end), Some(mine)) => mine > end,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                return if caught_up {
                    Move::Acquire {
                        reason: format!("switchover from {}", l.holder),
                    }
                } else {
                    Move::Wait(format!(
                        "switchover: waiting to receive {}'s WAL up to {}",
                        l.holder,
                        l.last_lsn.map(|l| l.to_string()).unwrap_or_default()
                    ))
                };
            }
        }
    } else {
        // No lease was ever granted: a new cluster, or one that ran before the lease existed.
        if i.local_primary_running {
            return Move::Acquire {
                reason: "the running primary takes the cluster's first lease".into(),
            };
        }
        if i.me == i.initial_primary && !i.peer_has_cluster {
            return Move::Acquire {
                reason: "bootstrap: the initial primary takes the first lease".into(),
            };
        }
        if i.candidates.iter().all(|c| c.received_lsn.is_none()) {
            return Move::Wait(format!(
                "waiting for the initial primary {} to bootstrap the cluster",
                i.initial_primary
            ));
        }
    }
    // A primary promoted on the fencing arbiter takes the lease in the group as soon as the
    // group can commit again; while it runs, nobody else takes it (it has the newest writes).
    if st.lease.is_some() {
        if i.arbiter_holding && i.local_primary_running {
            return Move::Acquire {
                reason: "the primary promoted on the fencing arbiter takes the lease in the \
                         group again"
                    .into(),
            };
        }
        if let Some(w) = i
            .candidates
            .iter()
            .find(|c| c.name != i.me && c.writable_primary)
        {
            return Move::Wait(format!(
                "{} runs a writable primary (promoted on the fencing arbiter): it takes the lease",
                w.name
            ));
        }
    }
    if st.paused {
        return Move::Wait("maintenance mode: no automatic failover".into());
    }
    elect(i)
}

/// What a member of a two-node cluster without a witness knows when its peer is gone.
#[derive(Clone, Debug)]
pub struct ArbiterInputs<'a> {
    pub me: &'a str,
    pub peer: &'a str,
    pub state: &'a ClusterState,
    pub now_ms: u64,
    /// `aws.fencing` is configured (not `none`).
    pub fencing: bool,
    /// The peer's agent answered at the last poll.
    pub peer_answering: bool,
    /// This member as a candidate (its PostgreSQL, lag, tags).
    pub me_candidate: Option<&'a Candidate>,
    /// The peer's instance was seen stopped after the lease on record ran out.
    pub peer_fenced: bool,
    /// The epoch this member holds on the arbiter now, if it does.
    pub arbiter_epoch: Option<u64>,
    /// How long the peer has not answered, as this agent saw it: `None` when this agent has
    /// not seen it answer since it started (then it never fences it).
    pub peer_gone_ms: Option<u64>,
    /// This agent itself held the lease on record (and lost it while running).
    pub held_here: bool,
}

/// The two-node fencing arbiter's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArbiterMove {
    /// The group works (or this is not a two-node cluster without a witness).
    NotNeeded,
    Wait(String),
    /// Stop the peer's instance and wait until it is stopped.
    Fence {
        peer: String,
    },
    /// The peer is stopped: hold the primary's lease locally (epoch on record + 1) and
    /// promote; commit it in the group once the peer is back.
    Hold {
        epoch: u64,
    },
}

/// How much longer a member that did not hold the last lease waits before it fences: the last
/// primary fences first (it has the newest writes), so that when each of two partitioned
/// nodes can still reach the EC2 API they do not stop each other.
pub fn arbiter_fencing_delay_ms(state: &ClusterState) -> u64 {
    2 * state.config.failover.ttl_ms()
}

/// With two members and no witness nothing commits once one is gone, so no lease can be
/// taken. With fencing configured the survivor may still take over, but only after it has
/// stopped the other instance and seen it stopped (EC2 is the third party): then the other
/// cannot write, and it cannot take the lease back without this member's vote either.
pub fn arbiter(i: &ArbiterInputs) -> ArbiterMove {
    let st = i.state;
    if let Some(epoch) = i.arbiter_epoch {
        // Held until the group commits a newer lease (this member's acquisition, once the
        // peer is back), also while the peer answers but the commit is still on its way.
        let committed = st.lease.as_ref().map_or(0, |l| l.epoch);
        return if committed < epoch {
            ArbiterMove::Hold { epoch }
        } else {
            ArbiterMove::NotNeeded
        };
    }
    if i.peer_answering {
        return ArbiterMove::NotNeeded;
    }
    if !i.fencing {
        return ArbiterMove::Wait(format!(
            "no majority: {} does not answer and a two-node cluster cannot commit without \
             it; configure a witness or EC2 fencing (aws.fencing) to fail over",
            i.peer
        ));
    }
    let Some(l) = &st.lease else {
        return ArbiterMove::Wait("no lease was ever granted: nothing to take over".into());
    };
    let drift = st.config.failover.drift_ms();
    if !st.acquirable(i.now_ms, drift) {
        return ArbiterMove::Wait(format!(
            "the lease of {} (epoch {}) has not run out yet",
            l.holder, l.epoch
        ));
    }
    if st.paused {
        return ArbiterMove::Wait("maintenance mode: no automatic failover".into());
    }
    let Some(me) = i.me_candidate else {
        return ArbiterMove::Wait("this member is not a candidate".into());
    };
    // The last holder that lost the lease while running stopped its PostgreSQL at its
    // deadline; it is the best candidate by definition (nobody has newer writes). Anyone else
    // — including a last holder that comes back after a stop — must be an eligible replica.
    let first = l.holder == i.me && i.held_here;
    if !first {
        if let Verdict::Ineligible(why) = verdict(me, &rules(st)) {
            return ArbiterMove::Wait(format!("not taking over with the fencing arbiter: {why}"));
        }
    }
    if i.peer_fenced {
        return ArbiterMove::Hold { epoch: l.epoch + 1 };
    }
    // Only a peer this agent saw alive and then lost is fenced: a member that starts while
    // its peer is unreachable (it may be the one that was fenced) waits instead.
    let Some(gone) = i.peer_gone_ms else {
        return ArbiterMove::Wait(format!(
            "{} has not answered since this agent started: not fencing it",
            i.peer
        ));
    };
    let need = st.config.failover.ttl_ms()
        + drift
        + if first {
            0
        } else {
            arbiter_fencing_delay_ms(st)
        };
    if gone < need {
        return ArbiterMove::Wait(if first {
            format!("{} gone for {gone} ms; fencing it at {need} ms", i.peer)
        } else {
            format!(
                "{} gone for {gone} ms; {} held the last lease and may fence first: this member \
                 fences {} at {need} ms",
                i.peer, l.holder, i.peer
            )
        });
    }
    ArbiterMove::Fence {
        peer: i.peer.to_string(),
    }
}

/// The lease is free: take it when this member is the best candidate.
fn elect(i: &Inputs) -> Move {
    let r = rules(i.state);
    let old = i.state.lease.as_ref();
    match choose(i.candidates, &r) {
        Some(best) if best.name == i.me => {
            let why = match old {
                Some(l) if l.released => format!("{} released the lease", l.holder),
                Some(l) => format!("the lease of {} (epoch {}) expired", l.holder, l.epoch),
                None => "no member holds the lease".into(),
            };
            Move::Acquire {
                reason: format!(
                    "failover: {why}; {} is the best candidate (failover_priority {}, received \
                     WAL {})",
                    best.name,
                    best.failover_priority,
                    best.received_lsn.map(|l| l.to_string()).unwrap_or_default()
                ),
            }
        }
        Some(best) => Move::Wait(format!("{} is the best candidate to take over", best.name)),
        None => {
            let mine = i
                .candidates
                .iter()
                .find(|c| c.name == i.me)
                .map(|c| match verdict(c, &r) {
                    Verdict::Eligible => "eligible".to_string(),
                    Verdict::Ineligible(why) => why,
                })
                .unwrap_or_else(|| "not a candidate".into());
            Move::Wait(format!(
                "no eligible candidate to take over (this member: {mine})"
            ))
        }
    }
}

/// The failover record of an acquisition this member is about to propose: who held the lease
/// and why it was lost, every candidate with its verdict, why this member wins, and the first
/// steps (the old lease's expiry, this decision).
pub fn failover_record(
    kind: ChangeKind,
    me: &str,
    state: &ClusterState,
    candidates: &[Candidate],
    now_ms: u64,
    won_because: &str,
) -> FailoverRecord {
    let r = rules(state);
    let lease = state.lease.as_ref();
    let lost_because = match lease {
        None => "no lease was ever granted".to_string(),
        Some(l) if l.released => format!(
            "{} released it{}",
            l.holder,
            l.successor
                .as_ref()
                .map(|s| format!(" to {s}"))
                .unwrap_or_default()
        ),
        Some(l) => format!(
            "{}'s lease (epoch {}) ran out at {} without a renewal",
            l.holder,
            l.epoch,
            crate::timefmt::format_rfc3339(l.expires_at_ms)
        ),
    };
    let mut steps = Vec::new();
    if let Some(l) = lease.filter(|l| !l.released) {
        steps.push(Step {
            step: "lease_expired".into(),
            at_ms: l.expires_at_ms,
            by: l.holder.clone(),
            detail: String::new(),
        });
    }
    steps.push(Step {
        step: "elected".into(),
        at_ms: now_ms,
        by: me.to_string(),
        detail: String::new(),
    });
    FailoverRecord {
        epoch: 0,
        kind,
        old_holder: lease.map(|l| l.holder.clone()),
        lost_because,
        old_released: lease.is_some_and(|l| l.released),
        new_holder: me.to_string(),
        won_because: won_because.to_string(),
        candidates: candidates
            .iter()
            .map(|c| CandidateRecord {
                name: c.name.clone(),
                received_lsn: c.received_lsn,
                lag_bytes: r
                    .primary_lsn
                    .zip(c.received_lsn)
                    .map(|(p, m)| p.bytes_after(m)),
                nofailover: c.nofailover,
                failover_priority: c.failover_priority,
                synchronous: state.sync.contains(&c.name),
                verdict: verdict(c, &r),
            })
            .collect(),
        old_primary_lsn: r.primary_lsn,
        steps,
    }
}

/// In how many ms this member should look at the lease again: every `regular_ms`, but right
/// when another member's lease becomes free (expiry + drift), and after 200 ms when its last
/// proposal failed while the lease is free, so a failover does not wait for a regular loop.
pub fn next_check_ms(
    me: &str,
    state: &ClusterState,
    now_ms: u64,
    regular_ms: u64,
    last_proposal_failed: bool,
) -> u64 {
    let drift = state.config.failover.drift_ms();
    if last_proposal_failed && state.acquirable(now_ms, drift) {
        return regular_ms.min(200);
    }
    match &state.lease {
        Some(l) if l.holder != me && !l.released => {
            let free_at = l.expires_at_ms + drift + 5;
            if free_at > now_ms {
                regular_ms.min(free_at - now_ms)
            } else {
                regular_ms
            }
        }
        _ => regular_ms,
    }
}

/// The role this member should have.
pub fn intent(me: &str, state: &ClusterState, holding: bool, initial_primary: &str) -> Intent {
    if holding {
        return Intent::primary();
    }
    match &state.lease {
        Some(l) if l.holder != me => Intent::replica_of(&l.holder),
        Some(_) => Intent::standby(),
        None if me == initial_primary => Intent::standby(),
        None => Intent::replica_of(initial_primary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Lease, Proposal};
    use crate::lsn::Lsn;
    use crate::status::DesiredRole;

    fn cand(name: &str, lsn: u64) -> Candidate {
        Candidate {
            writable_primary: false,
            name: name.into(),
            healthy: true,
            witness: false,
            nofailover: false,
            failover_priority: 1,
            received_lsn: Some(Lsn(lsn)),
        }
    }

    fn held(holder: &str, expires: u64) -> ClusterState {
        ClusterState {
            lease: Some(Lease {
                holder: holder.into(),
                epoch: 3,
                expires_at_ms: expires,
                last_lsn: Some(Lsn(1000)),
                released: false,
                successor: None,
                reserved_until_ms: 0,
            }),
            ..Default::default()
        }
    }

    fn inputs<'a>(me: &'a str, st: &'a ClusterState, now: u64, c: &'a [Candidate]) -> Inputs<'a> {
        Inputs {
            me,
            state: st,
            now_ms: now,
            holding: false,
            candidates: c,
            initial_primary: "a",
            local_primary_running: false,
            pg_down_ms: None,
            peer_has_cluster: true,
            arbiter_holding: false,
        }
    }

    fn arb<'a>(me: &'a str, st: &'a ClusterState, now: u64, c: &'a Candidate) -> ArbiterInputs<'a> {
        ArbiterInputs {
            me,
            peer: if me == "a" { "b" } else { "a" },
            state: st,
            now_ms: now,
            fencing: true,
            peer_answering: false,
            me_candidate: Some(c),
            peer_fenced: false,
            arbiter_epoch: None,
            peer_gone_ms: Some(0),
            held_here: me == "a",
        }
    }

    #[test]
    fn the_two_node_arbiter_fences_then_holds() {
        // "a" held epoch 3 until 10 000; drift 500; ttl 3000 → delay 6000.
        let st = held("a", 10_000);
        let b = cand("b", 1000);
        let mut i = arb("b", &st, 9_000, &b);
        i.peer_answering = true;
        assert_eq!(arbiter(&i), ArbiterMove::NotNeeded);
        i.peer_answering = false;
        i.fencing = false;
        assert!(
            matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("witness or EC2 fencing"))
        );
        i.fencing = true;
        assert!(matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("not run out")));
        // Free at 10 500. The peer must have been seen gone for ttl + drift (3 500 ms), and
        // 6 000 ms more by a member that did not hold the last lease.
        i.now_ms = 11_000;
        i.peer_gone_ms = Some(4_000);
        assert!(matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("fence first")));
        i.peer_gone_ms = Some(9_500);
        assert_eq!(arbiter(&i), ArbiterMove::Fence { peer: "a".into() });
        // A member that never saw its peer answer (it just started) never fences it.
        i.peer_gone_ms = None;
        assert!(
            matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("since this agent started"))
        );
        i.peer_gone_ms = Some(9_500);
        i.peer_fenced = true;
        assert_eq!(arbiter(&i), ArbiterMove::Hold { epoch: 4 });
        // Held also once the peer answers again, until a newer lease is committed.
        i.arbiter_epoch = Some(4);
        i.peer_answering = true;
        assert_eq!(arbiter(&i), ArbiterMove::Hold { epoch: 4 });
        let mut taken = held("b", 30_000);
        taken.lease.as_mut().unwrap().epoch = 4;
        i.state = &taken;
        assert_eq!(arbiter(&i), ArbiterMove::NotNeeded);
        // The last holder that lost the lease while running fences first (after ttl + drift).
        let a = cand("a", 1000);
        let mut j = arb("a", &st, 11_000, &a);
        j.peer_gone_ms = Some(3_000);
        assert!(matches!(arbiter(&j), ArbiterMove::Wait(_)));
        j.peer_gone_ms = Some(3_500);
        assert_eq!(arbiter(&j), ArbiterMove::Fence { peer: "b".into() });
        // The same member back after a stop (it did not hold the lease in this run) is an
        // ordinary candidate: with its PostgreSQL down it does not fence, whatever the record.
        let mut down = cand("a", 1000);
        down.healthy = false;
        let mut k = arb("a", &st, 60_000, &down);
        k.held_here = false;
        k.peer_gone_ms = Some(60_000);
        assert!(matches!(arbiter(&k), ArbiterMove::Wait(w) if w.contains("not taking over")));
    }

    #[test]
    fn the_arbiter_keeps_the_failover_rules() {
        let st = held("a", 10_000);
        let mut b = cand("b", 1000);
        b.healthy = false;
        let i = arb("b", &st, 20_000, &b);
        assert!(matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("not taking over")));
        let far = cand("b", 1);
        let mut st2 = held("a", 10_000);
        st2.lease.as_mut().unwrap().last_lsn = Some(Lsn(10 << 20));
        let i = arb("b", &st2, 20_000, &far);
        assert!(matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("maximum_lag")));
        let mut paused = held("a", 10_000);
        paused.paused = true;
        let b = cand("b", 1000);
        let i = arb("b", &paused, 20_000, &b);
        assert!(matches!(arbiter(&i), ArbiterMove::Wait(w) if w.contains("maintenance")));
    }

    #[test]
    fn an_arbiter_primary_takes_the_lease_back_and_nobody_else_does() {
        let st = held("a", 10_000);
        let mut b = cand("b", 1000);
        b.writable_primary = true;
        b.healthy = false;
        let a = cand("a", 900);
        let c = [a, b];
        let mut i = inputs("b", &st, 20_000, &c);
        i.local_primary_running = true;
        i.arbiter_holding = true;
        assert!(matches!(next_move(&i), Move::Acquire { reason } if reason.contains("arbiter")));
        // The returning peer sees it and waits instead of taking the lease with older data.
        let i = inputs("a", &st, 20_000, &c);
        assert!(matches!(next_move(&i), Move::Wait(w) if w.contains("b runs a writable primary")));
    }

    #[test]
    fn the_holder_renews_and_others_wait_while_the_lease_runs() {
        let st = held("a", 10_000);
        let c = [cand("b", 1000), cand("c", 1000)];
        let mut i = inputs("a", &st, 5_000, &c);
        assert_eq!(next_move(&i), Move::Renew, "after an agent restart");
        i.holding = true;
        assert_eq!(next_move(&i), Move::Nothing, "the lease task renews");
        for me in ["b", "c"] {
            assert_eq!(next_move(&inputs(me, &st, 5_000, &c)), Move::Nothing);
            // Expired, but not yet by the drift margin: still nothing.
            assert_eq!(next_move(&inputs(me, &st, 10_400, &c)), Move::Nothing);
        }
    }

    #[test]
    fn after_expiry_plus_drift_only_the_best_candidate_acquires() {
        let st = held("a", 10_000);
        let c = [cand("b", 900), cand("c", 1000)];
        let now = 10_000 + st.config.failover.drift_ms();
        assert!(
            matches!(next_move(&inputs("c", &st, now, &c)), Move::Acquire { reason } if reason.contains("expired"))
        );
        assert_eq!(
            next_move(&inputs("b", &st, now, &c)),
            Move::Wait("c is the best candidate to take over".into())
        );
        // Too far behind the old primary's last position: nobody.
        let far = [cand("b", 1), cand("c", 2)];
        let mut st2 = st.clone();
        st2.config.failover.maximum_lag_on_failover = 10;
        assert!(
            matches!(next_move(&inputs("c", &st2, now, &far)), Move::Wait(w) if w.contains("no eligible candidate") && w.contains("maximum_lag_on_failover"))
        );
    }

    #[test]
    fn maintenance_mode_stops_automatic_failover_but_not_renewal() {
        let mut st = held("a", 10_000);
        st.paused = true;
        let c = [cand("b", 1000)];
        assert!(
            matches!(next_move(&inputs("b", &st, 20_000, &c)), Move::Wait(w) if w.contains("maintenance"))
        );
        let mut i = inputs("a", &st, 5_000, &c);
        i.pg_down_ms = Some(600_000);
        assert_eq!(
            next_move(&i),
            Move::Renew,
            "paused: the holder keeps its lease"
        );
    }

    #[test]
    fn a_holder_whose_postgres_stays_down_releases_when_someone_can_take_over() {
        let st = held("a", 10_000);
        let c = [cand("a", 0), cand("b", 1000)];
        let mut i = inputs("a", &st, 5_000, &c);
        i.holding = true;
        i.pg_down_ms = Some(29_000);
        assert_eq!(next_move(&i), Move::Nothing);
        i.pg_down_ms = Some(31_000);
        assert!(
            matches!(next_move(&i), Move::Release { reason } if reason.contains("b can take over"))
        );
        let alone = [cand("a", 0)];
        i.candidates = &alone;
        assert_eq!(
            next_move(&i),
            Move::Nothing,
            "nobody else: keep trying locally"
        );
    }

    #[test]
    fn a_switchover_goes_to_the_successor_once_it_has_the_last_wal() {
        let mut st = held("a", 10_000);
        st.apply(
            &Proposal::Release {
                node: "a".into(),
                epoch: 3,
                lsn: Some(Lsn(2000)),
                successor: Some("c".into()),
                now_ms: 5_000,
                reserve_ms: 3_000,
            },
            500,
        )
        .unwrap();
        let behind = [cand("b", 5000), cand("c", 1999)];
        assert!(
            matches!(next_move(&inputs("c", &st, 5_100, &behind)), Move::Wait(w) if w.contains("waiting to receive"))
        );
        assert!(
            matches!(next_move(&inputs("b", &st, 5_100, &behind)), Move::Wait(w) if w.contains("reserved for c"))
        );
        let there = [cand("b", 5000), cand("c", 2001)];
        assert!(
            matches!(next_move(&inputs("c", &st, 5_100, &there)), Move::Acquire { reason } if reason == "switchover from a")
        );
        // The reservation ran out: an ordinary election (b has more WAL).
        assert!(matches!(
            next_move(&inputs("b", &st, 8_000, &behind)),
            Move::Acquire { .. }
        ));
    }

    #[test]
    fn the_first_lease_goes_to_the_initial_primary_or_a_running_primary() {
        let st = ClusterState::default();
        let none: [Candidate; 0] = [];
        let mut i = inputs("a", &st, 0, &none);
        i.peer_has_cluster = false;
        assert!(
            matches!(next_move(&i), Move::Acquire { reason } if reason.starts_with("bootstrap"))
        );
        i.peer_has_cluster = true;
        assert!(
            matches!(next_move(&i), Move::Wait(_)),
            "never a second initdb"
        );
        let mut j = inputs("b", &st, 0, &none);
        j.local_primary_running = true;
        assert!(matches!(next_move(&j), Move::Acquire { .. }));
        j.local_primary_running = false;
        assert!(matches!(next_move(&j), Move::Wait(w) if w.contains("initial primary")));
    }

    #[test]
    fn in_synchronous_mode_only_the_committed_set_may_take_over() {
        use crate::dynconfig::SyncMode;
        let mut st = held("a", 10_000);
        st.config.failover.synchronous_mode = SyncMode::On;
        st.sync = vec!["b".into()];
        // c has more WAL but is not synchronous; b is, so b wins and c waits.
        let c = [cand("b", 900), cand("c", 5000)];
        let now = 11_000;
        assert!(matches!(
            next_move(&inputs("b", &st, now, &c)),
            Move::Acquire { .. }
        ));
        assert_eq!(
            next_move(&inputs("c", &st, now, &c)),
            Move::Wait("b is the best candidate to take over".into())
        );
        // Strict with an empty set: nobody (writes were blocked, nothing to lose either way).
        st.config.failover.synchronous_mode = SyncMode::Strict;
        st.sync.clear();
        assert!(
            matches!(next_move(&inputs("b", &st, now, &c)), Move::Wait(w) if w.contains("synchronous"))
        );
        // On, degraded to an empty set: the lag limit decides.
        st.config.failover.synchronous_mode = SyncMode::On;
        st.config.failover.maximum_lag_on_failover = 10_000;
        assert!(matches!(
            next_move(&inputs("c", &st, now, &c)),
            Move::Acquire { .. }
        ));
    }

    #[test]
    fn the_record_names_every_candidate_and_why() {
        let mut st = held("a", 10_000);
        st.config.failover.maximum_lag_on_failover = 100;
        let mut b = cand("b", 990);
        b.failover_priority = 2;
        let mut c = cand("c", 1000);
        c.nofailover = true;
        let d = cand("d", 10);
        let r = failover_record(ChangeKind::Failover, "b", &st, &[b, c, d], 10_600, "best");
        assert_eq!(r.old_holder.as_deref(), Some("a"));
        assert!(r.lost_because.contains("ran out"), "{}", r.lost_because);
        assert_eq!(r.old_primary_lsn, Some(Lsn(1000)));
        let by_name = |n: &str| r.candidates.iter().find(|x| x.name == n).unwrap();
        assert_eq!(by_name("b").lag_bytes, Some(10));
        assert_eq!(by_name("b").verdict, Verdict::Eligible);
        assert!(
            matches!(&by_name("c").verdict, Verdict::Ineligible(w) if w.contains("nofailover"))
        );
        assert!(
            matches!(&by_name("d").verdict, Verdict::Ineligible(w) if w.contains("maximum_lag_on_failover"))
        );
        let steps: Vec<_> = r.steps.iter().map(|s| (s.step.as_str(), s.at_ms)).collect();
        assert_eq!(steps, [("lease_expired", 10_000), ("elected", 10_600)]);
    }

    #[test]
    fn the_next_check_lands_when_the_lease_becomes_free() {
        let st = held("a", 10_000);
        let drift = st.config.failover.drift_ms();
        assert_eq!(next_check_ms("b", &st, 9_800, 1000, false), drift + 205);
        assert_eq!(next_check_ms("b", &st, 5_000, 1000, false), 1000);
        assert_eq!(
            next_check_ms("a", &st, 9_800, 1000, false),
            1000,
            "its own lease"
        );
        assert_eq!(
            next_check_ms("b", &st, 20_000, 1000, true),
            200,
            "retry soon"
        );
        assert_eq!(next_check_ms("b", &st, 20_000, 1000, false), 1000);
    }

    #[test]
    fn intent_follows_the_holder() {
        let st = held("a", 10_000);
        assert_eq!(intent("a", &st, true, "a").role, DesiredRole::Primary);
        assert_eq!(intent("b", &st, false, "a"), Intent::replica_of("a"));
        // The holder on record whose deadline passed is never writable.
        assert_eq!(intent("a", &st, false, "a"), Intent::standby());
        let fresh = ClusterState::default();
        assert_eq!(intent("b", &fresh, false, "a"), Intent::replica_of("a"));
        assert_eq!(intent("a", &fresh, false, "a"), Intent::standby());
    }
}
