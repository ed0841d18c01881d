//! The `list` table: one row per member, like the tables DBAs read in `patronictl list`.

use pgwarden_core::api::ClusterView;
use pgwarden_core::status::{PgState, Role};

/// The role as the table shows it.
pub(crate) fn role(s: &pgwarden_core::status::NodeStatus) -> &'static str {
    if s.witness {
        return "Witness";
    }
    match s.role {
        Role::Primary if s.is_writable_primary() => "Primary",
        Role::Primary => "Primary (stepping down)",
        Role::Replica if s.is_sync_standby() => "Sync Standby",
        Role::Replica => "Replica",
        Role::Unknown => "",
    }
}

/// The state as the table shows it.
pub(crate) fn state(s: &pgwarden_core::status::NodeStatus) -> String {
    if s.is_streaming() {
        return "streaming".into();
    }
    match s.state {
        PgState::Running => "running",
        PgState::Starting => "starting",
        PgState::Stopping => "stopping",
        PgState::Stopped => "stopped",
        PgState::Bootstrapping => "bootstrapping",
        PgState::Cloning => "creating replica",
        PgState::Rewinding => "rewinding",
        PgState::Refused => "refused",
        PgState::Unknown => "unknown",
    }
    .into()
}

/// A table with a border, a header row and the rows, as lines; `title` goes in the top border.
pub(crate) fn table(title: Option<&str>, header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let sep = |title: Option<&str>| {
        let mut line: String = w
            .iter()
            .map(|n| format!("+{}", "-".repeat(n + 2)))
            .collect();
        line.push('+');
        if let Some(t) = title {
            let t = format!("+ {t} ");
            if t.len() < line.len() {
                line.replace_range(..t.len(), &t);
            }
        }
        line
    };
    let row = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(&format!("| {c:<width$} ", width = w[i]));
        }
        s.push('|');
        s
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = vec![sep(title), row(&header), sep(None)];
    for r in rows {
        out.push(row(r));
    }
    out.push(sep(None));
    out
}

/// Renders the cluster as a table.
pub fn render(view: &ClusterView) -> String {
    let header = ["Member", "Host", "Role", "State", "TL", "Lag in MB"];
    let mut rows: Vec<[String; 6]> = Vec::new();
    for m in &view.members {
        let host = format!("{}:{}", m.host, m.pg_port);
        rows.push(match &m.status {
            None => [
                m.name.clone(),
                host,
                String::new(),
                "unreachable".into(),
                String::new(),
                String::new(),
            ],
            Some(s) => [
                m.name.clone(),
                host,
                role(s).into(),
                state(s),
                s.timeline.map(|t| t.to_string()).unwrap_or_default(),
                match (s.role, s.lag_bytes) {
                    (Role::Replica, Some(l)) => format!("{:.1}", l as f64 / 1_048_576.0),
                    (Role::Replica, None) => "unknown".into(),
                    _ => String::new(),
                },
            ],
        });
    }
    let sysid = view
        .members
        .iter()
        .find_map(|m| m.status.as_ref().and_then(|s| s.system_identifier.clone()));
    let title = match sysid {
        Some(id) => format!("Cluster: {} ({id})", view.cluster),
        None => format!("Cluster: {}", view.cluster),
    };
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    let mut out = table(Some(&title), &header, &rows);
    let paused = view
        .members
        .iter()
        .filter_map(|m| m.status.as_ref()?.consensus.as_ref())
        .any(|c| c.paused);
    if paused {
        out.push(" Maintenance mode: on".into());
    }
    let reporter = view
        .members
        .iter()
        .find(|m| m.name == view.reported_by)
        .and_then(|m| m.status.as_ref()?.failover_readiness.as_ref());
    if let Some(r) = reporter {
        out.push(match (&r.best, r.ready) {
            (Some(b), true) => format!(" Failover ready: yes (best candidate: {b})"),
            _ => format!(" Failover ready: NO: {}", r.reasons.join("; ")),
        });
    }
    out.extend(endpoint_lines(view));
    out.join("\n") + "\n"
}

/// Who carries the client endpoints, and the members that could not take them over now.
fn endpoint_lines(view: &ClusterView) -> Vec<String> {
    let mut out = Vec::new();
    for m in &view.members {
        let Some(ep) = m.status.as_ref().and_then(|s| s.endpoints.as_ref()) else {
            continue;
        };
        if !ep.held.is_empty() {
            let zone = ep
                .placement
                .as_ref()
                .map(|p| format!(" [{} {}]", p.instance_id, p.availability_zone))
                .unwrap_or_default();
            out.push(format!(
                " Endpoints on {}{zone}: {}",
                m.name,
                ep.held.join(", ")
            ));
        }
        if !ep.ready {
            out.push(format!(
                " Endpoints NOT ready on {}: {}",
                m.name,
                ep.problems.join("; ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::api::MemberView;
    use pgwarden_core::status::*;

    fn member(name: &str, status: Option<NodeStatus>) -> MemberView {
        MemberView {
            name: name.into(),
            host: format!("10.0.0.{}", &name[1..]),
            pg_port: 5432,
            api_port: 8443,
            status,
        }
    }

    #[test]
    fn renders_roles_states_and_lag() {
        let primary = NodeStatus {
            role: Role::Primary,
            state: PgState::Running,
            intent: Intent::primary(),
            timeline: Some(2),
            system_identifier: Some("7301".into()),
            failover_readiness: Some(pgwarden_core::candidate::Readiness {
                ready: false,
                best: None,
                reasons: vec!["no eligible candidate (n2: tagged nofailover)".into()],
                candidates: vec![],
            }),
            ..Default::default()
        };
        let replica = NodeStatus {
            role: Role::Replica,
            state: PgState::Running,
            intent: Intent::replica_of("n1"),
            timeline: Some(2),
            lag_bytes: Some(3 * 1_048_576 / 2),
            wal_receiver: Some(WalReceiver {
                status: "streaming".into(),
                ..Default::default()
            }),
            sync_state: Some("sync".into()),
            consensus: Some(Consensus {
                paused: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = ClusterView {
            cluster: "main".into(),
            reported_by: "n1".into(),
            members: vec![
                member("n1", Some(primary)),
                member("n2", Some(replica)),
                member("n3", None),
            ],
        };
        let t = render(&view);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("+ Cluster: main (7301) "), "{t}");
        assert_eq!(
            lines[1].split('|').map(str::trim).collect::<Vec<_>>()[1..7],
            ["Member", "Host", "Role", "State", "TL", "Lag in MB"]
        );
        let cells = |l: &str| {
            l.split('|')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[3])[1..7],
            ["n1", "10.0.0.1:5432", "Primary", "running", "2", ""]
        );
        assert_eq!(
            cells(lines[4])[1..7],
            [
                "n2",
                "10.0.0.2:5432",
                "Sync Standby",
                "streaming",
                "2",
                "1.5"
            ]
        );
        assert_eq!(
            cells(lines[5])[1..7],
            ["n3", "10.0.0.3:5432", "", "unreachable", "", ""]
        );
        assert_eq!(lines[7], " Maintenance mode: on");
        assert!(!t.contains("Endpoints"), "{t}");
        assert_eq!(
            lines[8],
            " Failover ready: NO: no eligible candidate (n2: tagged nofailover)"
        );
        // Every line of the table has the same width.
        let width = lines[0].len();
        assert!(lines[..7].iter().all(|l| l.chars().count() == width), "{t}");
    }

    #[test]
    fn the_endpoint_holder_and_unready_members_are_listed() {
        use pgwarden_core::endpoints::EndpointStatus;
        let mut view = ClusterView {
            cluster: "main".into(),
            reported_by: "n1".into(),
            members: vec![],
        };
        for (name, held, ready) in [("n1", true, true), ("n2", false, false)] {
            let st = NodeStatus {
                name: name.into(),
                endpoints: Some(EndpointStatus {
                    held: if held {
                        vec!["10.0.0.100/24 on eth0 (vip)".into()]
                    } else {
                        vec![]
                    },
                    ready,
                    problems: if ready {
                        vec![]
                    } else {
                        vec!["ec2:AssociateAddress is not permitted".into()]
                    },
                    ..Default::default()
                }),
                ..Default::default()
            };
            view.members.push(pgwarden_core::api::MemberView {
                name: name.into(),
                host: "10.0.0.1".into(),
                pg_port: 5432,
                api_port: 8443,
                status: Some(st),
            });
        }
        let t = render(&view);
        assert!(
            t.contains(" Endpoints on n1: 10.0.0.100/24 on eth0 (vip)\n"),
            "{t}"
        );
        assert!(
            t.contains(" Endpoints NOT ready on n2: ec2:AssociateAddress is not permitted\n"),
            "{t}"
        );
    }
}
