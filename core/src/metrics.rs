//! Prometheus text exposition of a node's status (`GET /metrics`).

use crate::status::{NodeStatus, PgState, Role};
use std::fmt::Write;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics of one node.
pub fn render(s: &NodeStatus) -> String {
    let labels = format!("cluster=\"{}\",node=\"{}\"", esc(&s.cluster), esc(&s.name));
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, values: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (extra, v) in values {
            let _ = writeln!(out, "{name}{{{labels}{extra}}} {v}");
        }
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    gauge(
        "pgwarden_postgres_up",
        "1 when PostgreSQL is running and answering",
        "gauge",
        &[(String::new(), b(s.state == PgState::Running))],
    );
    gauge(
        "pgwarden_role",
        "1 for the role PostgreSQL runs in",
        "gauge",
        &[
            (",role=\"primary\"".into(), b(s.role == Role::Primary)),
            (",role=\"replica\"".into(), b(s.role == Role::Replica)),
        ],
    );
    if let Some(t) = s.timeline {
        gauge(
            "pgwarden_timeline",
            "PostgreSQL timeline",
            "gauge",
            &[(String::new(), t as f64)],
        );
    }
    let mut lsns = Vec::new();
    for (k, v) in [
        ("write", s.wal.write),
        ("flush", s.wal.flush),
        ("received", s.wal.received),
        ("replayed", s.wal.replayed),
    ] {
        if let Some(l) = v {
            lsns.push((format!(",kind=\"{k}\""), l.0 as f64));
        }
    }
    gauge(
        "pgwarden_wal_lsn_bytes",
        "WAL positions as byte offsets",
        "gauge",
        &lsns,
    );
    if let Some(l) = s.lag_bytes {
        gauge(
            "pgwarden_replication_lag_bytes",
            "replay lag behind the primary in bytes",
            "gauge",
            &[(String::new(), l as f64)],
        );
    }
    let streaming = s
        .replication
        .iter()
        .filter(|r| r.state == "streaming")
        .count();
    gauge(
        "pgwarden_replicas_streaming",
        "replication connections in streaming state",
        "gauge",
        &[(String::new(), streaming as f64)],
    );
    gauge(
        "pgwarden_postgres_crash_restarts_total",
        "PostgreSQL restarts after it died",
        "counter",
        &[(String::new(), s.crash_restarts as f64)],
    );
    gauge(
        "pgwarden_pending_restart",
        "1 when a changed parameter needs a restart",
        "gauge",
        &[(String::new(), b(s.pending_restart))],
    );
    if let Some(p) = s.basebackup {
        gauge(
            "pgwarden_basebackup_bytes",
            "base backup progress",
            "gauge",
            &[
                (",kind=\"done\"".into(), p.done_bytes as f64),
                (",kind=\"total\"".into(), p.total_bytes as f64),
            ],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::*;

    #[test]
    fn renders_prometheus_text() {
        let s = NodeStatus {
            name: "n1".into(),
            cluster: "main".into(),
            role: Role::Replica,
            state: PgState::Running,
            timeline: Some(3),
            lag_bytes: Some(42),
            crash_restarts: 2,
            wal: WalPositions {
                replayed: Some(crate::Lsn(0x100)),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = render(&s);
        assert!(
            t.contains("pgwarden_postgres_up{cluster=\"main\",node=\"n1\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("pgwarden_role{cluster=\"main\",node=\"n1\",role=\"replica\"} 1\n"));
        assert!(t.contains("pgwarden_role{cluster=\"main\",node=\"n1\",role=\"primary\"} 0\n"));
        assert!(t.contains("pgwarden_timeline{cluster=\"main\",node=\"n1\"} 3\n"));
        assert!(t.contains("pgwarden_replication_lag_bytes{cluster=\"main\",node=\"n1\"} 42\n"));
        assert!(t.contains(
            "pgwarden_wal_lsn_bytes{cluster=\"main\",node=\"n1\",kind=\"replayed\"} 256\n"
        ));
        assert!(
            t.contains("pgwarden_postgres_crash_restarts_total{cluster=\"main\",node=\"n1\"} 2\n")
        );
        assert!(t.contains("# TYPE pgwarden_postgres_crash_restarts_total counter"));
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
        }
    }
}
