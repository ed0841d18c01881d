//! The Patroni-compatible health checks: which status code each endpoint answers for a status.
//! HAProxy (`option httpchk OPTIONS /master`), keepalived (`curl --fail …/primary`) and AWS NLB
//! target groups rely on exactly these rules.

use crate::lsn::parse_size;
use crate::status::NodeStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// `/primary`, `/master`, `/leader`, `/read-write`.
    Primary,
    /// `/replica`: a running, streaming replica (within `?lag=` when given).
    Replica,
    /// `/read-only`: the primary or a running replica.
    ReadOnly,
    /// `/health`: PostgreSQL is running.
    Health,
    /// `/sync`: a synchronous standby.
    Sync,
    /// `/async`: a streaming replica that is not synchronous.
    Async,
    /// `/liveness`: the agent's loop is alive.
    Liveness,
    /// `/readiness`: ready to serve its role.
    Readiness,
}

impl Check {
    pub fn from_path(path: &str) -> Option<Check> {
        Some(match path.trim_end_matches('/') {
            "/primary" | "/master" | "/leader" | "/read-write" => Check::Primary,
            "/replica" | "/standby" => Check::Replica,
            "/read-only" => Check::ReadOnly,
            "/health" => Check::Health,
            "/sync" | "/synchronous" => Check::Sync,
            "/async" | "/asynchronous" => Check::Async,
            "/liveness" => Check::Liveness,
            "/readiness" => Check::Readiness,
            _ => return None,
        })
    }
}

/// Query options of a check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// `?lag=16MB` or `?lag=16777216`: replicas further behind answer 503.
    pub max_lag: Option<u64>,
}

impl CheckOptions {
    /// Parses a raw query string such as `lag=16MB`. Unknown parameters are ignored, as Patroni
    /// does; a malformed `lag` is an error so a typo does not silently disable the lag limit.
    pub fn from_query(query: Option<&str>) -> Result<CheckOptions, String> {
        let mut o = CheckOptions::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == "lag" {
                o.max_lag = Some(parse_size(v).map_err(|e| format!("lag: {e}"))?);
            }
        }
        Ok(o)
    }
}

/// Inputs that come from the agent's clock rather than from the status.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now_ms: u64,
    /// The loop counts as dead when it has not completed for this long.
    pub liveness_timeout_ms: u64,
}

fn lag_ok(status: &NodeStatus, opts: CheckOptions) -> bool {
    match opts.max_lag {
        None => true,
        // Unknown lag is not "no lag": a replica that cannot tell answers 503.
        Some(max) => status.lag_bytes.is_some_and(|l| l <= max),
    }
}

/// True when the check passes (HTTP 200); false means HTTP 503.
pub fn passes(check: Check, status: &NodeStatus, opts: CheckOptions, clock: Clock) -> bool {
    match check {
        Check::Primary => status.is_writable_primary(),
        Check::Replica => {
            status.is_streaming() && !status.tags.noloadbalance && lag_ok(status, opts)
        }
        Check::ReadOnly => {
            status.is_writable_primary()
                || (status.is_running_replica()
                    && !status.tags.noloadbalance
                    && lag_ok(status, opts))
        }
        Check::Health => status.state == crate::status::PgState::Running,
        Check::Sync => status.is_streaming() && status.is_sync_standby(),
        Check::Async => status.is_streaming() && !status.is_sync_standby() && lag_ok(status, opts),
        Check::Liveness => {
            status.last_loop_ms > 0
                && clock.now_ms.saturating_sub(status.last_loop_ms) <= clock.liveness_timeout_ms
        }
        Check::Readiness => {
            status.is_writable_primary() || (status.is_streaming() && lag_ok(status, opts))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::*;

    fn primary() -> NodeStatus {
        NodeStatus {
            role: Role::Primary,
            state: PgState::Running,
            intent: Intent::primary(),
            last_loop_ms: 1_000,
            ..Default::default()
        }
    }
    fn replica(lag: Option<u64>) -> NodeStatus {
        NodeStatus {
            role: Role::Replica,
            state: PgState::Running,
            intent: Intent::replica_of("n1"),
            lag_bytes: lag,
            wal_receiver: Some(WalReceiver {
                status: "streaming".into(),
                ..Default::default()
            }),
            last_loop_ms: 1_000,
            ..Default::default()
        }
    }
    const CLOCK: Clock = Clock {
        now_ms: 2_000,
        liveness_timeout_ms: 5_000,
    };
    fn ok(path: &str, s: &NodeStatus) -> bool {
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        let check = Check::from_path(p).unwrap();
        passes(check, s, CheckOptions::from_query(Some(q)).unwrap(), CLOCK)
    }

    #[test]
    fn primary_aliases_answer_only_on_the_primary() {
        for p in ["/primary", "/master", "/leader", "/read-write", "/primary/"] {
            assert!(ok(p, &primary()), "{p}");
            assert!(!ok(p, &replica(Some(0))), "{p}");
        }
    }

    #[test]
    fn primary_that_should_step_down_fails_primary_check() {
        let mut s = primary();
        s.intent = Intent::replica_of("n2");
        assert!(!ok("/primary", &s));
        s = primary();
        s.state = PgState::Starting;
        assert!(!ok("/primary", &s));
    }

    #[test]
    fn replica_check_and_lag() {
        let r = replica(Some(10 << 20));
        assert!(ok("/replica", &r));
        assert!(ok("/replica?lag=16MB", &r));
        assert!(!ok("/replica?lag=1MB", &r));
        assert!(ok("/replica?lag=10485760", &r));
        assert!(!ok("/replica?lag=10485759", &r));
        assert!(
            !ok("/replica?lag=1MB", &replica(None)),
            "unknown lag fails a lag check"
        );
        assert!(ok("/replica", &replica(None)));
        assert!(!ok("/replica", &primary()));
        let mut not_streaming = replica(Some(0));
        not_streaming.wal_receiver = None;
        assert!(!ok("/replica", &not_streaming));
        assert!(ok("/read-only", &not_streaming));
    }

    #[test]
    fn read_only_health_sync_async() {
        assert!(ok("/read-only", &primary()));
        assert!(ok("/read-only", &replica(Some(0))));
        assert!(ok("/health", &primary()));
        let mut stopped = replica(Some(0));
        stopped.state = PgState::Stopped;
        for p in ["/health", "/read-only", "/replica", "/readiness", "/async"] {
            assert!(!ok(p, &stopped), "{p}");
        }
        let mut sync = replica(Some(0));
        sync.sync_state = Some("sync".into());
        assert!(ok("/sync", &sync));
        assert!(!ok("/async", &sync));
        assert!(!ok("/sync", &replica(Some(0))));
        assert!(ok("/async", &replica(Some(0))));
        assert!(!ok("/sync", &primary()));
        assert!(!ok("/async", &primary()));
    }

    #[test]
    fn liveness_follows_the_loop() {
        let mut s = primary();
        assert!(ok("/liveness", &s));
        s.last_loop_ms = 0;
        assert!(!ok("/liveness", &s), "a loop that never ran is not alive");
        let late = Clock {
            now_ms: 10_000,
            liveness_timeout_ms: 5_000,
        };
        let s = primary();
        assert!(!passes(Check::Liveness, &s, CheckOptions::default(), late));
        let mut stopped = primary();
        stopped.state = PgState::Stopped;
        assert!(
            ok("/liveness", &stopped),
            "liveness is about the agent, not PostgreSQL"
        );
    }

    #[test]
    fn a_dead_postmaster_or_a_stopping_node_fails_every_check() {
        for s in [
            primary().with_postmaster_alive(false),
            NodeStatus {
                state: PgState::Stopping,
                ..primary()
            },
        ] {
            for p in ["/primary", "/read-only", "/health", "/readiness"] {
                assert!(!ok(p, &s), "{p} on {:?}", s.state);
            }
        }
        for s in [
            replica(Some(0)).with_postmaster_alive(false),
            NodeStatus {
                state: PgState::Stopping,
                ..replica(Some(0))
            },
        ] {
            for p in ["/replica", "/read-only", "/health", "/async"] {
                assert!(!ok(p, &s), "{p} on {:?}", s.state);
            }
        }
        assert!(ok("/primary", &primary().with_postmaster_alive(true)));
    }

    #[test]
    fn noloadbalance_takes_a_replica_out_of_read_balancing() {
        let mut r = replica(Some(0));
        r.tags.noloadbalance = true;
        assert!(!ok("/replica", &r));
        assert!(!ok("/read-only", &r));
        assert!(ok("/health", &r), "it still runs");
        assert!(ok("/readiness", &r), "and still replicates");
        let mut p = primary();
        p.tags.noloadbalance = true;
        assert!(ok("/read-only", &p), "the primary always takes reads");
    }

    #[test]
    fn readiness() {
        assert!(ok("/readiness", &primary()));
        assert!(ok("/readiness", &replica(Some(0))));
        assert!(!ok("/readiness?lag=1kB", &replica(Some(4096))));
    }

    #[test]
    fn unknown_paths_and_bad_lag() {
        assert_eq!(Check::from_path("/nope"), None);
        assert!(CheckOptions::from_query(Some("lag=fast")).is_err());
        assert_eq!(
            CheckOptions::from_query(Some("foo=bar&lag=1kB"))
                .unwrap()
                .max_lag,
            Some(1024)
        );
    }
}
