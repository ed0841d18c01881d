//! What a node should do next: the agent's one decision function. It takes the intent (what the
//! node should be), what the agent observed, and any one-shot request, and returns one action.
//! The agent executes the action and asks again on the next loop; every action is idempotent,
//! so a crash between two steps is repaired by the next decision.
//!
//! The intent comes from the lease (`elect::intent`): the holder is the primary, the others
//! follow it, and a member without a lease and without a holder to follow is a standby
//! without an upstream — never a writable primary.

use crate::status::{DesiredRole, Intent, Role};

/// The state of the data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: a new cluster or a new replica can be made here.
    Empty,
    /// A PostgreSQL data directory of the expected major version.
    Valid { standby_signal: bool },
    /// A data directory of another major version: never touched.
    WrongVersion { found: u32, expected: u32 },
    /// Something that is not a PostgreSQL data directory: never touched.
    NotPostgres(String),
}

/// The postmaster as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Postmaster {
    Stopped,
    /// Alive but not (yet) answering SQL.
    Starting,
    /// Answering SQL in this role.
    Running(Role),
}

/// A one-shot request from the API that is not a change of intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneShot {
    Restart,
    Reinitialize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub data_dir: DataDir,
    pub postmaster: Postmaster,
    /// The member the running or configured `primary_conninfo` points at.
    pub following: Option<String>,
    /// A running replica whose WAL has diverged from its upstream's timeline.
    pub diverged: bool,
    /// This node is the configured initial primary and may run initdb.
    pub may_bootstrap: bool,
    /// Some peer already runs a PostgreSQL cluster (so initdb would make a second one).
    pub peer_has_cluster: bool,
    /// The intended upstream runs PostgreSQL and can serve a base backup.
    pub upstream_ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Converged: nothing to do.
    Nothing,
    /// Not yet possible; the reason is shown in the status.
    Wait(String),
    /// Will not be done at all (the data directory is unusable); shown as the last error.
    Refuse(String),
    /// initdb, configure, start, create the replication role.
    Bootstrap,
    /// pg_basebackup from the member into the empty data directory, then start as its replica.
    Clone {
        from: String,
    },
    /// Start PostgreSQL; as a standby of `standby_of` when set (rewinding first if diverged).
    Start {
        standby_of: Option<String>,
    },
    /// Start PostgreSQL as a standby with no upstream (read-only).
    StartStandby,
    /// This member may not write: stop PostgreSQL at once (immediate shutdown).
    StepDown,
    Promote,
    /// Point a running replica at another upstream.
    Follow {
        upstream: String,
    },
    /// Stop, pg_rewind from `from`, start as its standby (base backup if rewind fails).
    Rejoin {
        from: String,
    },
    Restart,
    /// Move the data directory aside and clone again from `from`.
    Reinitialize {
        from: String,
    },
}

/// Decides the next action.
pub fn next_action(intent: &Intent, obs: &Observed, pending: Option<OneShot>) -> Action {
    let upstream = intent.upstream.clone();
    match &obs.data_dir {
        DataDir::WrongVersion { found, expected } => {
            return Action::Refuse(format!(
                "the data directory belongs to PostgreSQL {found}, this node runs {expected}; \
                 it is left untouched (upgrade it or point data_dir elsewhere)"
            ))
        }
        DataDir::NotPostgres(why) => {
            return Action::Refuse(format!(
            "the data directory is not a PostgreSQL data directory ({why}); it is left untouched"
        ))
        }
        _ => {}
    }
    if pending == Some(OneShot::Reinitialize) {
        return match (intent.role, upstream) {
            (DesiredRole::Replica, Some(from)) => Action::Reinitialize { from },
            _ => Action::Refuse("only a replica can be reinitialized".into()),
        };
    }
    match (&obs.data_dir, obs.postmaster) {
        (DataDir::Empty, Postmaster::Stopped) => match (intent.role, upstream) {
            (DesiredRole::Primary, _) if obs.peer_has_cluster => Action::Wait(
                "the data directory is empty but a peer already runs this cluster: \
                 refusing to initdb a second one; make this node a replica"
                    .into(),
            ),
            (DesiredRole::Primary, _) if !obs.may_bootstrap => Action::Wait(
                "the data directory is empty and this node is not the initial primary".into(),
            ),
            (DesiredRole::Primary, _) => Action::Bootstrap,
            (DesiredRole::Replica, Some(from)) if obs.upstream_ready => Action::Clone { from },
            (DesiredRole::Replica, Some(from)) => {
                Action::Wait(format!("waiting for {from} to run before cloning from it"))
            }
            (DesiredRole::Replica, None) => Action::Wait("no primary to clone from".into()),
        },
        (DataDir::Empty, _) => Action::Wait("PostgreSQL runs without a data directory".into()),
        (DataDir::Valid { .. }, Postmaster::Stopped) => match (intent.role, upstream) {
            (DesiredRole::Primary, _) => Action::Start { standby_of: None },
            (DesiredRole::Replica, Some(up)) => Action::Start {
                standby_of: Some(up),
            },
            (DesiredRole::Replica, None) => Action::StartStandby,
        },
        (DataDir::Valid { .. }, Postmaster::Starting) => {
            Action::Wait("PostgreSQL is starting".into())
        }
        (DataDir::Valid { .. }, Postmaster::Running(Role::Unknown)) => {
            Action::Wait("PostgreSQL's role is not known yet".into())
        }
        (DataDir::Valid { .. }, Postmaster::Running(Role::Replica)) => match intent.role {
            DesiredRole::Primary => Action::Promote,
            DesiredRole::Replica => {
                let Some(up) = upstream else {
                    return Action::Wait("no primary holds the lease".into());
                };
                if obs.following.as_deref() != Some(up.as_str()) {
                    Action::Follow { upstream: up }
                } else if obs.diverged {
                    Action::Rejoin { from: up }
                } else if pending == Some(OneShot::Restart) {
                    Action::Restart
                } else {
                    Action::Nothing
                }
            }
        },
        (DataDir::Valid { .. }, Postmaster::Running(Role::Primary)) => match intent.role {
            // Writable without the lease: stop at once; it starts again as a standby.
            DesiredRole::Replica => Action::StepDown,
            DesiredRole::Primary if pending == Some(OneShot::Restart) => Action::Restart,
            DesiredRole::Primary => Action::Nothing,
        },
        (DataDir::WrongVersion { .. } | DataDir::NotPostgres(_), _) => {
            Action::Refuse("unusable data directory".into())
        }
    }
}

/// Where a new replica of `upstream` takes its base backup from: a running peer tagged
/// `clonefrom` (the one that replayed the most WAL) when there is one, else the upstream. The
/// new replica streams from `upstream` either way.
pub fn clone_source(upstream: &str, peers: &[crate::status::NodeStatus]) -> String {
    peers
        .iter()
        .filter(|p| p.tags.clonefrom && p.state == crate::status::PgState::Running)
        .filter(|p| p.is_writable_primary() || p.is_streaming())
        .max_by_key(|p| {
            (
                p.wal.replayed.or(p.wal.write),
                std::cmp::Reverse(p.name.clone()),
            )
        })
        .map(|p| p.name.clone())
        .unwrap_or_else(|| upstream.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(data_dir: DataDir, postmaster: Postmaster) -> Observed {
        Observed {
            data_dir,
            postmaster,
            following: None,
            diverged: false,
            may_bootstrap: false,
            peer_has_cluster: false,
            upstream_ready: true,
        }
    }
    const VALID: DataDir = DataDir::Valid {
        standby_signal: false,
    };

    #[test]
    fn empty_data_directory() {
        let mut o = obs(DataDir::Empty, Postmaster::Stopped);
        assert!(matches!(
            next_action(&Intent::primary(), &o, None),
            Action::Wait(_)
        ));
        o.may_bootstrap = true;
        assert_eq!(next_action(&Intent::primary(), &o, None), Action::Bootstrap);
        o.peer_has_cluster = true;
        assert!(
            matches!(next_action(&Intent::primary(), &o, None), Action::Wait(w) if w.contains("second")),
            "never initdb a second cluster"
        );
        assert_eq!(
            next_action(&Intent::replica_of("n1"), &o, None),
            Action::Clone { from: "n1".into() }
        );
        o.upstream_ready = false;
        assert!(matches!(
            next_action(&Intent::replica_of("n1"), &o, None),
            Action::Wait(w) if w.contains("n1")
        ));
    }

    #[test]
    fn unusable_data_directories_are_refused_whatever_is_asked() {
        for dd in [
            DataDir::WrongVersion {
                found: 12,
                expected: 15,
            },
            DataDir::NotPostgres("no PG_VERSION".into()),
        ] {
            for intent in [Intent::primary(), Intent::replica_of("n1")] {
                for pending in [None, Some(OneShot::Reinitialize), Some(OneShot::Restart)] {
                    let a = next_action(&intent, &obs(dd.clone(), Postmaster::Stopped), pending);
                    assert!(matches!(a, Action::Refuse(_)), "{dd:?} {pending:?}: {a:?}");
                }
            }
        }
    }

    #[test]
    fn start_in_the_intended_role() {
        let o = obs(VALID, Postmaster::Stopped);
        assert_eq!(
            next_action(&Intent::primary(), &o, None),
            Action::Start { standby_of: None }
        );
        assert_eq!(
            next_action(&Intent::replica_of("n1"), &o, None),
            Action::Start {
                standby_of: Some("n1".into())
            }
        );
        let starting = obs(VALID, Postmaster::Starting);
        assert!(matches!(
            next_action(&Intent::primary(), &starting, None),
            Action::Wait(_)
        ));
    }

    #[test]
    fn role_changes() {
        let rep = obs(VALID, Postmaster::Running(Role::Replica));
        assert_eq!(next_action(&Intent::primary(), &rep, None), Action::Promote);
        let prim = obs(VALID, Postmaster::Running(Role::Primary));
        // A writable primary without the lease stops at once, whoever holds it.
        assert_eq!(
            next_action(&Intent::replica_of("n2"), &prim, None),
            Action::StepDown
        );
        assert_eq!(
            next_action(&Intent::standby(), &prim, None),
            Action::StepDown
        );
        // Stopped without a lease: it starts read-only, never as a primary.
        let stopped = obs(VALID, Postmaster::Stopped);
        assert_eq!(
            next_action(&Intent::standby(), &stopped, None),
            Action::StartStandby
        );
        assert_eq!(
            next_action(&Intent::standby(), &rep, None),
            Action::Wait("no primary holds the lease".into())
        );
        assert_eq!(
            next_action(&Intent::primary(), &prim, None),
            Action::Nothing
        );
    }

    #[test]
    fn replicas_follow_and_rejoin() {
        let mut o = obs(VALID, Postmaster::Running(Role::Replica));
        o.following = Some("n1".into());
        assert_eq!(
            next_action(&Intent::replica_of("n1"), &o, None),
            Action::Nothing
        );
        assert_eq!(
            next_action(&Intent::replica_of("n3"), &o, None),
            Action::Follow {
                upstream: "n3".into()
            }
        );
        o.diverged = true;
        assert_eq!(
            next_action(&Intent::replica_of("n1"), &o, None),
            Action::Rejoin { from: "n1".into() }
        );
    }

    #[test]
    fn clone_source_prefers_a_running_clonefrom_peer() {
        use crate::status::{NodeStatus, PgState, WalReceiver};
        use crate::Lsn;
        let peer = |name: &str, clonefrom: bool, streaming: bool, replayed: u64| {
            let mut s = NodeStatus {
                name: name.into(),
                role: Role::Replica,
                state: PgState::Running,
                wal_receiver: streaming.then(|| WalReceiver {
                    status: "streaming".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            s.tags.clonefrom = clonefrom;
            s.wal.replayed = Some(Lsn(replayed));
            s
        };
        assert_eq!(clone_source("n1", &[]), "n1");
        assert_eq!(clone_source("n1", &[peer("n2", false, true, 9)]), "n1");
        assert_eq!(clone_source("n1", &[peer("n2", true, true, 9)]), "n2");
        assert_eq!(
            clone_source(
                "n1",
                &[peer("n2", true, true, 5), peer("n3", true, true, 9)]
            ),
            "n3",
            "the most caught-up clonefrom peer"
        );
        assert_eq!(
            clone_source("n1", &[peer("n2", true, false, 9)]),
            "n1",
            "not a replica that does not stream"
        );
        let mut down = peer("n2", true, true, 9);
        down.state = PgState::Stopped;
        assert_eq!(clone_source("n1", &[down]), "n1");
    }

    #[test]
    fn one_shots() {
        let mut o = obs(VALID, Postmaster::Running(Role::Replica));
        o.following = Some("n1".into());
        let r = Intent::replica_of("n1");
        assert_eq!(next_action(&r, &o, Some(OneShot::Restart)), Action::Restart);
        assert_eq!(
            next_action(&r, &o, Some(OneShot::Reinitialize)),
            Action::Reinitialize { from: "n1".into() }
        );
        let p = obs(VALID, Postmaster::Running(Role::Primary));
        assert_eq!(
            next_action(&Intent::primary(), &p, Some(OneShot::Restart)),
            Action::Restart
        );
        assert!(matches!(
            next_action(&Intent::primary(), &p, Some(OneShot::Reinitialize)),
            Action::Refuse(_)
        ));
    }
}
