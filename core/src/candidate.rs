//! Which replica to promote when the primary is gone: a pure function of what the vote knows
//! about each member. Rules, in order: the member must be a healthy replica, not tagged
//! `nofailover`, with `failover_priority` above 0, and either in the committed synchronous set
//! (synchronous mode) or within `maximum_lag_on_failover` of the old primary's last reported
//! WAL position (asynchronous mode). Among the eligible: highest `failover_priority`, then
//! highest received LSN, then name.

use crate::lsn::Lsn;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// What is known about one member when choosing a new primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    /// PostgreSQL runs as a replica and the member's agent answered recently.
    pub healthy: bool,
    /// A witness runs no PostgreSQL and can never be promoted.
    pub witness: bool,
    pub nofailover: bool,
    /// 0 means never; higher is preferred. Default 1.
    pub failover_priority: u32,
    /// The last WAL position the replica received (flushed).
    pub received_lsn: Option<Lsn>,
    /// PostgreSQL runs as a writable primary there (possible without a committed lease only
    /// on the two-node fencing arbiter, see `elect::arbiter`).
    #[serde(default)]
    pub writable_primary: bool,
}

/// The cluster-wide inputs of the choice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// Bytes a replica may be behind the old primary's last reported position.
    pub maximum_lag_on_failover: u64,
    /// The last WAL position the old primary reported (with its lease renewals).
    pub primary_lsn: Option<Lsn>,
    /// In synchronous mode, the committed synchronous set: only its members may be promoted.
    pub sync_set: Option<Vec<String>>,
}

/// Whether a member may be promoted, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "lowercase")]
pub enum Verdict {
    Eligible,
    Ineligible(String),
}

pub fn verdict(c: &Candidate, r: &Rules) -> Verdict {
    let no = |why: String| Verdict::Ineligible(why);
    if c.witness {
        return no("a witness runs no PostgreSQL".into());
    }
    if !c.healthy {
        return no("not a healthy replica".into());
    }
    if c.nofailover {
        return no("tagged nofailover".into());
    }
    if c.failover_priority == 0 {
        return no("failover_priority is 0".into());
    }
    let Some(received) = c.received_lsn else {
        return no("its received WAL position is unknown".into());
    };
    match &r.sync_set {
        Some(set) => {
            if !set.iter().any(|s| s == &c.name) {
                return no("not in the committed synchronous set".into());
            }
        }
        None => {
            if let Some(p) = r.primary_lsn {
                let lag = p.bytes_after(received);
                if lag > r.maximum_lag_on_failover {
                    return no(format!(
                        "{lag} bytes behind the old primary's last position {p}, more than maximum_lag_on_failover ({})",
                        r.maximum_lag_on_failover
                    ));
                }
            }
        }
    }
    Verdict::Eligible
}

/// Orders eligible candidates, best first.
fn better(a: &Candidate, b: &Candidate) -> Ordering {
    b.failover_priority
        .cmp(&a.failover_priority)
        .then(b.received_lsn.cmp(&a.received_lsn))
        .then(a.name.cmp(&b.name))
}

/// The best eligible candidate, if any.
pub fn choose<'a>(candidates: &'a [Candidate], rules: &Rules) -> Option<&'a Candidate> {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| verdict(c, rules) == Verdict::Eligible)
        .collect();
    eligible.sort_by(|a, b| better(a, b));
    eligible.first().copied()
}

/// Could the cluster fail over right now, and to whom?
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// The member a failover would promote now.
    pub best: Option<String>,
    /// Why it could not, when it could not.
    pub reasons: Vec<String>,
    /// Every member other than the primary, with its verdict.
    pub candidates: Vec<(String, Verdict)>,
}

/// The default `maximum_lag_on_failover` (as in Patroni): 1 MiB.
pub const DEFAULT_MAXIMUM_LAG_ON_FAILOVER: u64 = 1 << 20;

/// Readiness from the candidates (every member but the primary), whether a majority of the
/// members agrees on a leader of the replicated log, and the rules.
pub fn readiness(candidates: &[Candidate], quorum: bool, rules: &Rules) -> Readiness {
    let verdicts: Vec<(String, Verdict)> = candidates
        .iter()
        .map(|c| (c.name.clone(), verdict(c, rules)))
        .collect();
    let best = choose(candidates, rules).map(|c| c.name.clone());
    let mut reasons = Vec::new();
    if !quorum {
        reasons.push("no majority of the members agrees on a leader".to_string());
    }
    if best.is_none() {
        let why: Vec<String> = verdicts
            .iter()
            .filter_map(|(n, v)| match v {
                Verdict::Ineligible(w) => Some(format!("{n}: {w}")),
                Verdict::Eligible => None,
            })
            .collect();
        reasons.push(if why.is_empty() {
            "no replica to promote".to_string()
        } else {
            format!("no eligible candidate ({})", why.join("; "))
        });
    }
    Readiness {
        ready: reasons.is_empty(),
        best,
        reasons,
        candidates: verdicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, prio: u32, lsn: u64) -> Candidate {
        Candidate {
            writable_primary: false,
            name: name.into(),
            healthy: true,
            witness: false,
            nofailover: false,
            failover_priority: prio,
            received_lsn: Some(Lsn(lsn)),
        }
    }
    fn rules(max_lag: u64, primary: u64) -> Rules {
        Rules {
            maximum_lag_on_failover: max_lag,
            primary_lsn: Some(Lsn(primary)),
            sync_set: None,
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            cands: Vec<Candidate>,
            rules: Rules,
            want: Option<&'static str>,
        }
        let mut unhealthy = c("a", 1, 100);
        unhealthy.healthy = false;
        let mut nof = c("a", 5, 100);
        nof.nofailover = true;
        let mut wit = c("w", 9, 100);
        wit.witness = true;
        let mut unknown = c("a", 1, 0);
        unknown.received_lsn = None;
        let cases = vec![
            Case {
                name: "highest lsn wins",
                cands: vec![c("a", 1, 90), c("b", 1, 100)],
                rules: rules(1000, 100),
                want: Some("b"),
            },
            Case {
                name: "priority beats lsn",
                cands: vec![c("a", 2, 90), c("b", 1, 100)],
                rules: rules(1000, 100),
                want: Some("a"),
            },
            Case {
                name: "name breaks ties",
                cands: vec![c("b", 1, 100), c("a", 1, 100)],
                rules: rules(1000, 100),
                want: Some("a"),
            },
            Case {
                name: "lag limit",
                cands: vec![c("a", 1, 10), c("b", 1, 50)],
                rules: rules(60, 100),
                want: Some("b"),
            },
            Case {
                name: "lag limit excludes all",
                cands: vec![c("a", 1, 10), c("b", 1, 20)],
                rules: rules(50, 100),
                want: None,
            },
            Case {
                name: "lag exactly at the limit is allowed",
                cands: vec![c("a", 1, 50)],
                rules: rules(50, 100),
                want: Some("a"),
            },
            Case {
                name: "priority 0 never",
                cands: vec![c("a", 0, 100)],
                rules: rules(1000, 100),
                want: None,
            },
            Case {
                name: "nofailover never, even alone",
                cands: vec![nof.clone()],
                rules: rules(1000, 100),
                want: None,
            },
            Case {
                name: "nofailover skipped",
                cands: vec![nof, c("b", 1, 10)],
                rules: rules(1000, 100),
                want: Some("b"),
            },
            Case {
                name: "unhealthy skipped",
                cands: vec![unhealthy, c("b", 1, 10)],
                rules: rules(1000, 100),
                want: Some("b"),
            },
            Case {
                name: "witness never",
                cands: vec![wit, c("b", 1, 10)],
                rules: rules(1000, 100),
                want: Some("b"),
            },
            Case {
                name: "unknown position never",
                cands: vec![unknown],
                rules: rules(1000, 100),
                want: None,
            },
            Case {
                name: "sync set only, lag ignored",
                cands: vec![c("a", 1, 100), c("b", 1, 10)],
                rules: Rules {
                    maximum_lag_on_failover: 0,
                    primary_lsn: Some(Lsn(100)),
                    sync_set: Some(vec!["b".into()]),
                },
                want: Some("b"),
            },
            Case {
                name: "unknown primary position: no lag check",
                cands: vec![c("a", 1, 1)],
                rules: Rules {
                    maximum_lag_on_failover: 0,
                    primary_lsn: None,
                    sync_set: None,
                },
                want: Some("a"),
            },
        ];
        for case in cases {
            let got = choose(&case.cands, &case.rules).map(|c| c.name.as_str());
            assert_eq!(got, case.want, "{}", case.name);
        }
    }

    #[test]
    fn readiness_needs_quorum_and_a_candidate() {
        let r = rules(1000, 100);
        let ok = readiness(&[c("a", 1, 100), c("b", 1, 90)], true, &r);
        assert!(ok.ready);
        assert_eq!(ok.best.as_deref(), Some("a"));
        assert!(ok.reasons.is_empty());
        let no_quorum = readiness(&[c("a", 1, 100)], false, &r);
        assert!(!no_quorum.ready);
        assert!(no_quorum.reasons[0].contains("majority"));
        let mut nof = c("a", 1, 100);
        nof.nofailover = true;
        let none = readiness(&[nof, c("b", 0, 100)], true, &r);
        assert!(!none.ready);
        assert_eq!(none.best, None);
        assert!(
            none.reasons[0].contains("a: tagged nofailover"),
            "{:?}",
            none.reasons
        );
        assert!(
            none.reasons[0].contains("b: failover_priority is 0"),
            "{:?}",
            none.reasons
        );
        assert!(!readiness(&[], true, &r).ready);
    }

    #[test]
    fn verdicts_say_why() {
        let v = verdict(&c("a", 1, 10), &rules(50, 100));
        assert!(
            matches!(&v, Verdict::Ineligible(w) if w.contains("90 bytes behind")),
            "{v:?}"
        );
        let json = serde_json::to_string(&v).unwrap();
        assert!(json.contains("\"verdict\":\"ineligible\""), "{json}");
    }
}
