//! Synchronous replication: which standbys the primary waits for, and the order of changes that
//! keeps "only a member of the committed synchronous set may be promoted" safe.
//!
//! Invariant: the committed set `C` (in the replicated state) is always a subset of the names
//! PostgreSQL waits for (`S`, `synchronous_standby_names`, where every listed standby must
//! confirm). Then every acknowledged write is on every member of `C`, and promoting any member
//! of `C` loses nothing. So:
//! - adding a standby: first add it to `S`, wait until PostgreSQL reports it synchronous, then
//!   commit it to `C`;
//! - removing one: first commit `C` without it, then drop it from `S`;
//! - `on` with no standby available: commit an empty `C`, then clear `S` (degraded: writes
//!   are acknowledged without a standby, and failover falls back to the lag limit);
//! - `strict` with no standby available: keep `S` (writes block until one returns).
//!
//! `plan` returns one step at a time; the agent runs it and asks again on its next loop.

use crate::dynconfig::SyncMode;
use crate::lsn::Lsn;

/// A standby as the primary sees it in `pg_stat_replication`, with its tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standby {
    pub name: String,
    /// `state = 'streaming'`.
    pub streaming: bool,
    /// PostgreSQL reports it synchronous (`sync_state` `sync` or `quorum`).
    pub confirmed: bool,
    pub nosync: bool,
    /// 0 means never synchronous; higher is preferred.
    pub sync_priority: u32,
    pub flush_lsn: Option<Lsn>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncStep {
    Nothing,
    /// Commit this set to the group.
    Commit(Vec<String>),
    /// Make PostgreSQL wait for exactly these standbys (`*`: any one standby).
    Wait(Vec<String>),
}

/// Any one standby (strict mode with no known standby).
pub const ANY: &str = "*";

fn same(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

/// The next step from the committed set `committed` and the names PostgreSQL waits for now
/// (`waiting`), towards `count` synchronous standbys chosen among `standbys`.
pub fn plan(
    mode: SyncMode,
    count: u32,
    committed: &[String],
    waiting: &[String],
    standbys: &[Standby],
) -> SyncStep {
    if mode == SyncMode::Off {
        return if !committed.is_empty() {
            SyncStep::Commit(Vec::new())
        } else if !waiting.is_empty() {
            SyncStep::Wait(Vec::new())
        } else {
            SyncStep::Nothing
        };
    }
    let mut eligible: Vec<&Standby> = standbys
        .iter()
        .filter(|s| s.streaming && !s.nosync && s.sync_priority > 0)
        .collect();
    // Keep current members first (no flapping), then priority, then most WAL, then name.
    eligible.sort_by(|a, b| {
        let ka = (committed.contains(&a.name), a.sync_priority, a.flush_lsn);
        let kb = (committed.contains(&b.name), b.sync_priority, b.flush_lsn);
        kb.cmp(&ka).then_with(|| a.name.cmp(&b.name))
    });
    let target: Vec<String> = eligible
        .iter()
        .take(count.max(1) as usize)
        .map(|s| s.name.clone())
        .collect();
    if target.is_empty() {
        return match mode {
            SyncMode::Strict if waiting.is_empty() => SyncStep::Wait(if committed.is_empty() {
                vec![ANY.to_string()]
            } else {
                committed.to_vec()
            }),
            SyncMode::Strict => SyncStep::Nothing,
            _ if !committed.is_empty() => SyncStep::Commit(Vec::new()),
            _ if !waiting.is_empty() => SyncStep::Wait(Vec::new()),
            _ => SyncStep::Nothing,
        };
    }
    let kept: Vec<String> = committed
        .iter()
        .filter(|m| target.contains(m))
        .cloned()
        .collect();
    if kept.len() != committed.len() {
        return SyncStep::Commit(kept);
    }
    if !same(waiting, &target) {
        return SyncStep::Wait(target);
    }
    let confirmed: Vec<String> = target
        .iter()
        .filter(|t| committed.contains(t) || standbys.iter().any(|s| &s.name == *t && s.confirmed))
        .cloned()
        .collect();
    if confirmed.len() != committed.len() {
        return SyncStep::Commit(confirmed);
    }
    SyncStep::Nothing
}

/// What a member waits for right after its promotion: the committed set without itself or,
/// when that is empty, any one standby (so its first writes are already on a standby; in `on`
/// mode the plan degrades to asynchronous if none streams); nothing outside synchronous
/// mode. Standbys keep this value ready, so a promotion needs no reload.
pub fn names_for_promotion(mode: SyncMode, committed: &[String], me: &str) -> Vec<String> {
    let set: Vec<String> = committed.iter().filter(|m| *m != me).cloned().collect();
    match mode {
        SyncMode::Off => Vec::new(),
        _ if set.is_empty() => vec![ANY.to_string()],
        _ => set,
    }
}

/// `synchronous_standby_names` for a set: every listed standby must confirm.
pub fn render(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    if names.iter().any(|n| n == ANY) {
        return "ANY 1 (*)".into();
    }
    let list: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    format!("FIRST {} ({})", names.len(), list.join(", "))
}

/// The standby names in a `synchronous_standby_names` value (`FIRST k (…)`, `ANY k (…)`, or
/// a plain list).
pub fn parse(value: &str) -> Vec<String> {
    let v = value.trim();
    if v.is_empty() {
        return Vec::new();
    }
    let inner = match (v.find('('), v.rfind(')')) {
        (Some(a), Some(b)) if b > a => &v[a + 1..b],
        _ => v,
    };
    inner
        .split(',')
        .map(|n| n.trim().trim_matches('"').replace("\"\"", "\""))
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(name: &str, streaming: bool, confirmed: bool) -> Standby {
        Standby {
            name: name.into(),
            streaming,
            confirmed,
            nosync: false,
            sync_priority: 1,
            flush_lsn: Some(Lsn(100)),
        }
    }
    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Runs the plan against a model of PostgreSQL (a standby is confirmed once it streams and
    /// is waited for) until nothing is left, checking the invariant after every step.
    fn converge(
        mode: SyncMode,
        count: u32,
        mut c: Vec<String>,
        mut w: Vec<String>,
        sbs: &[Standby],
    ) -> (Vec<String>, Vec<String>) {
        for _ in 0..10 {
            let model: Vec<Standby> = sbs
                .iter()
                .map(|s| Standby {
                    confirmed: s.streaming && w.contains(&s.name),
                    ..s.clone()
                })
                .collect();
            match plan(mode, count, &c, &w, &model) {
                SyncStep::Nothing => return (c, w),
                SyncStep::Commit(n) => c = n,
                SyncStep::Wait(n) => w = n,
            }
            assert!(
                c.iter().all(|m| w.contains(m)),
                "committed {c:?} must be waited for ({w:?})"
            );
        }
        panic!("no convergence: {c:?} {w:?}");
    }

    #[test]
    fn a_standby_is_waited_for_before_it_is_committed() {
        let sbs = [sb("b", true, false), sb("c", true, false)];
        assert_eq!(
            plan(SyncMode::On, 1, &[], &[], &sbs),
            SyncStep::Wait(v(&["b"]))
        );
        // Not yet confirmed: nothing to commit.
        assert_eq!(
            plan(SyncMode::On, 1, &[], &v(&["b"]), &sbs),
            SyncStep::Nothing
        );
        let conf = [sb("b", true, true), sb("c", true, false)];
        assert_eq!(
            plan(SyncMode::On, 1, &[], &v(&["b"]), &conf),
            SyncStep::Commit(v(&["b"]))
        );
        assert_eq!(
            converge(SyncMode::On, 2, vec![], vec![], &sbs),
            (v(&["b", "c"]), v(&["b", "c"]))
        );
    }

    #[test]
    fn a_standby_that_stops_streaming_is_dropped_from_the_set_first_then_replaced() {
        let sbs = [sb("b", false, false), sb("c", true, false)];
        assert_eq!(
            plan(SyncMode::On, 1, &v(&["b"]), &v(&["b"]), &sbs),
            SyncStep::Commit(vec![])
        );
        assert_eq!(
            converge(SyncMode::On, 1, v(&["b"]), v(&["b"]), &sbs),
            (v(&["c"]), v(&["c"]))
        );
        assert_eq!(
            converge(SyncMode::Strict, 1, v(&["b"]), v(&["b"]), &sbs),
            (v(&["c"]), v(&["c"]))
        );
    }

    #[test]
    fn on_degrades_and_strict_keeps_writes_blocked() {
        let none = [sb("b", false, false)];
        assert_eq!(
            converge(SyncMode::On, 1, v(&["b"]), v(&["b"]), &none),
            (vec![], vec![])
        );
        assert_eq!(
            converge(SyncMode::Strict, 1, v(&["b"]), v(&["b"]), &none),
            (v(&["b"]), v(&["b"]))
        );
        // A new primary in strict mode with no set yet waits for any standby.
        assert_eq!(
            plan(SyncMode::Strict, 1, &[], &[], &none),
            SyncStep::Wait(v(&[ANY]))
        );
        // Back on: a returning standby is taken again.
        let back = [sb("b", true, false)];
        assert_eq!(
            converge(SyncMode::On, 1, vec![], vec![], &back),
            (v(&["b"]), v(&["b"]))
        );
    }

    #[test]
    fn tags_and_priorities_choose_the_standbys() {
        let mut a = sb("a", true, false);
        a.nosync = true;
        let mut b = sb("b", true, false);
        b.sync_priority = 1;
        let mut c = sb("c", true, false);
        c.sync_priority = 5;
        let mut d = sb("d", true, false);
        d.sync_priority = 0;
        assert_eq!(
            converge(
                SyncMode::On,
                1,
                vec![],
                vec![],
                &[a, b.clone(), c.clone(), d]
            ),
            (v(&["c"]), v(&["c"]))
        );
        // A current member is kept even when a higher priority one appears (no flapping).
        assert_eq!(
            converge(SyncMode::On, 1, v(&["b"]), v(&["b"]), &[b, c]),
            (v(&["b"]), v(&["b"]))
        );
    }

    #[test]
    fn off_clears_everything() {
        let sbs = [sb("b", true, true)];
        assert_eq!(
            converge(SyncMode::Off, 1, v(&["b"]), v(&["b"]), &sbs),
            (vec![], vec![])
        );
    }

    #[test]
    fn a_promoted_member_waits_for_the_rest_of_the_set_or_any_standby() {
        assert_eq!(
            names_for_promotion(SyncMode::Off, &v(&["b"]), "a"),
            Vec::<String>::new()
        );
        assert_eq!(
            names_for_promotion(SyncMode::On, &v(&["a", "b"]), "a"),
            v(&["b"])
        );
        assert_eq!(
            names_for_promotion(SyncMode::On, &v(&["a"]), "a"),
            v(&[ANY])
        );
        assert_eq!(names_for_promotion(SyncMode::Strict, &[], "a"), v(&[ANY]));
    }

    #[test]
    fn standby_names_round_trip() {
        assert_eq!(render(&v(&["n2", "n3"])), "FIRST 2 (\"n2\", \"n3\")");
        assert_eq!(parse("FIRST 2 (\"n2\", \"n3\")"), v(&["n2", "n3"]));
        assert_eq!(parse("ANY 1 (*)"), v(&["*"]));
        assert_eq!(render(&v(&["*"])), "ANY 1 (*)");
        assert_eq!(parse(""), Vec::<String>::new());
        assert_eq!(parse("n2, n3"), v(&["n2", "n3"]));
        assert_eq!(render(&[]), "");
    }
}
