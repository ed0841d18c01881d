//! What server-mode commands print: a cluster's nodes as the `list` table, the node
//! inventory, event lines, join and API tokens, users, the configuration history, webhooks
//! and their deliveries.

use crate::list::table;
use crate::server::{ClusterDetail, EventRow, NodeRow};
use pgwarden_core::status::Role;
use serde_json::Value;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn time(ms: i64) -> String {
    pgwarden_core::timefmt::format_rfc3339(ms.max(0) as u64)
}

/// How long ago `ms` was, in the largest whole unit: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(ms: i64, now: i64) -> String {
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// How long until `ms`, or that it passed.
pub fn until(ms: i64, now: i64) -> String {
    let s = (ms - now) / 1000;
    match s {
        ..0 => "expired".into(),
        0..60 => format!("in {s}s"),
        60..3600 => format!("in {}m", s / 60),
        3600..86_400 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86_400),
    }
}

fn opt_time(ms: Option<i64>, none: &str) -> String {
    ms.map_or(none.to_string(), time)
}

/// A node's role, state, timeline and lag cells, from its reported status when it can be
/// read, else from the server's summary of it.
fn node_cells(n: &NodeRow) -> [String; 4] {
    let lag = |role_is_replica: bool, lag: Option<i64>| match (role_is_replica, lag) {
        (true, Some(l)) => format!("{:.1}", l as f64 / 1_048_576.0),
        (true, None) => "unknown".into(),
        _ => String::new(),
    };
    match n.node_status() {
        Some(s) => [
            crate::list::role(&s).to_string(),
            crate::list::state(&s),
            s.timeline.map(|t| t.to_string()).unwrap_or_default(),
            lag(
                s.role == Role::Replica,
                s.lag_bytes.and_then(|l| i64::try_from(l).ok()),
            ),
        ],
        None => {
            let mut role = n.role.clone();
            if let Some(f) = role.get_mut(..1) {
                f.make_ascii_uppercase();
            }
            if role == "Unknown" {
                role.clear();
            }
            [
                role,
                n.pg_state.clone(),
                n.timeline.map(|t| t.to_string()).unwrap_or_default(),
                lag(n.role == "replica", n.lag_bytes),
            ]
        }
    }
}

fn agent_cell(n: &NodeRow, now: i64) -> String {
    if n.agent_up {
        "up".into()
    } else if n.last_report_ms > 0 {
        format!("down (last report {})", ago(n.last_report_ms, now))
    } else {
        "down".into()
    }
}

/// One event as one line: `time  cluster/node  type  message`.
pub fn event_line(e: &EventRow) -> String {
    format!(
        "{}  {}/{}  {}  {}",
        time(e.ts_ms),
        e.cluster,
        e.node,
        e.kind,
        e.message
    )
}

/// A cluster as the `list` table: one row per node (member, role, state, timeline, lag,
/// whether its agent reports), then maintenance mode, failover readiness and the last event.
pub fn cluster(c: &ClusterDetail, now: i64) -> String {
    let header = ["Member", "Role", "State", "TL", "Lag in MB", "Agent"];
    let rows: Vec<Vec<String>> = c
        .nodes
        .iter()
        .map(|n| {
            let mut r = vec![n.name.clone()];
            r.extend(node_cells(n));
            r.push(agent_cell(n, now));
            r
        })
        .collect();
    let statuses: Vec<_> = c.nodes.iter().filter_map(|n| n.node_status()).collect();
    let title = match statuses.iter().find_map(|s| s.system_identifier.clone()) {
        Some(id) => format!("Cluster: {} ({id})", c.name),
        None => format!("Cluster: {}", c.name),
    };
    let mut out = table(Some(&title), &header, &rows);
    if c.nodes.is_empty() {
        out.push(format!(
            " No node has reported yet: enroll one with a join token \
             (pgwardenctl token create --cluster {}).",
            c.name
        ));
    }
    if c.paused {
        out.push(" Maintenance mode: on".into());
    }
    // The readiness as the primary (else any node) sees it.
    let src = c
        .primary
        .as_ref()
        .and_then(|p| c.nodes.iter().find(|n| &n.name == p))
        .or(c.nodes.first())
        .and_then(|n| n.node_status())
        .and_then(|s| s.failover_readiness);
    match (src, c.failover_ready) {
        (Some(r), _) => out.push(match (&r.best, r.ready) {
            (Some(b), true) => format!(" Failover ready: yes (best candidate: {b})"),
            _ => format!(" Failover ready: NO: {}", r.reasons.join("; ")),
        }),
        (None, Some(true)) => out.push(" Failover ready: yes".into()),
        (None, Some(false)) => out.push(" Failover ready: NO".into()),
        (None, None) => {}
    }
    if let Some(e) = &c.last_event {
        out.push(format!(" Last event: {}", event_line(e)));
    }
    out.join("\n") + "\n"
}

/// The node inventory.
pub fn nodes(nodes: &[NodeRow], now: i64) -> String {
    let header = [
        "Cluster",
        "Node",
        "Role",
        "State",
        "TL",
        "Lag in MB",
        "Agent",
        "Version",
        "Last report",
        "API",
    ];
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let mut r = vec![n.cluster.clone(), n.name.clone()];
            r.extend(node_cells(n));
            r.push(if n.agent_up { "up" } else { "down" }.into());
            r.push(n.agent_version.clone());
            r.push(if n.last_report_ms > 0 {
                ago(n.last_report_ms, now)
            } else {
                "never".into()
            });
            r.push(n.api_url.clone());
            r
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Join tokens (never the tokens themselves): who made them, until when, whether used.
pub fn join_tokens(items: &[Value], now: i64) -> String {
    let header = ["ID", "Cluster", "Created by", "Created", "Expires", "Used"];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            let expires = t["expires_ms"].as_i64().unwrap_or(0);
            let used = match t["used_ms"].as_i64() {
                Some(u) => format!("by {} at {}", s(t, "used_by"), time(u)),
                None if expires <= now => "unused (expired)".into(),
                None => "unused".into(),
            };
            vec![
                s(t, "id"),
                s(t, "cluster"),
                s(t, "created_by"),
                time(t["created_ms"].as_i64().unwrap_or(0)),
                format!("{} ({})", time(expires), until(expires, now)),
                used,
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

/// API tokens (never the tokens themselves).
pub fn api_tokens(items: &[Value]) -> String {
    let header = ["ID", "User", "Name", "Created", "Expires", "Last used"];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            vec![
                s(t, "id"),
                s(t, "user"),
                s(t, "name"),
                time(t["created_ms"].as_i64().unwrap_or(0)),
                opt_time(t["expires_ms"].as_i64(), "never"),
                opt_time(t["last_used_ms"].as_i64(), "never"),
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

/// Users and their roles.
pub fn users(items: &[Value]) -> String {
    let header = ["User", "Role", "Status", "Created"];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|u| {
            vec![
                s(u, "name"),
                s(u, "role"),
                if u["disabled"] == Value::Bool(true) {
                    "disabled"
                } else {
                    "active"
                }
                .into(),
                time(u["created_ms"].as_i64().unwrap_or(0)),
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

/// Configuration changes made through the server, newest first.
pub fn config_history(items: &[Value]) -> String {
    let header = ["Seq", "Time", "By", "Command", "Change"];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                s(c, "seq"),
                time(c["ts_ms"].as_i64().unwrap_or(0)),
                s(c, "actor"),
                s(c, "command_id"),
                c["patch"].to_string(),
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

/// A webhook's filter in a few words: `all events`, or its types, clusters and severity.
pub fn webhook_filter(w: &Value) -> String {
    let names = |k: &str| -> Vec<String> {
        w[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut parts = Vec::new();
    let types = names("event_types");
    if !types.is_empty() {
        parts.push(format!("types {}", types.join(",")));
    }
    let clusters = names("clusters");
    if !clusters.is_empty() {
        parts.push(format!("clusters {}", clusters.join(",")));
    }
    match w["min_severity"].as_str() {
        Some("info") | None => {}
        Some(sev) => parts.push(format!("severity >= {sev}")),
    }
    if parts.is_empty() {
        "all events".into()
    } else {
        parts.join("; ")
    }
}

fn enabled(w: &Value) -> &'static str {
    if w["enabled"] == Value::Bool(false) {
        "no"
    } else {
        "yes"
    }
}

/// Webhooks: the URL as the server shows it (without its path to non-admins), never a secret.
pub fn webhooks(items: &[Value]) -> String {
    let header = ["ID", "Name", "Format", "Enabled", "URL", "Filter"];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|w| {
            vec![
                s(w, "id"),
                s(w, "name"),
                s(w, "format"),
                enabled(w).into(),
                s(w, "url"),
                webhook_filter(w),
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

/// One webhook, as `webhook add` and `webhook set` print it.
pub fn webhook(w: &Value) -> String {
    let mut out = format!(
        "webhook {} ({:?}): format {}, {}\n  url:    {}\n  filter: {}\n",
        s(w, "id"),
        s(w, "name"),
        s(w, "format"),
        if enabled(w) == "yes" {
            "enabled"
        } else {
            "disabled"
        },
        s(w, "url"),
        webhook_filter(w),
    );
    if w["routing_key_set"] == Value::Bool(true) {
        out.push_str("  PagerDuty routing key set\n");
    }
    out
}

/// What an attempt got: the HTTP status and the start of the answer, or the error.
pub fn attempt_outcome(a: &Value) -> String {
    let answer: String = a["response"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .take(80)
        .collect();
    let mut out = match a["status_code"].as_i64() {
        Some(c) => format!("HTTP {c}"),
        None => "no answer".into(),
    };
    if let Some(e) = a["error"].as_str().filter(|e| !e.is_empty()) {
        out.push_str(&format!(": {e}"));
    } else if !answer.is_empty() {
        out.push_str(&format!(": {answer}"));
    }
    out
}

/// One attempt as one line: number, server, time, latency, outcome.
pub fn attempt_line(a: &Value) -> String {
    format!(
        "attempt {} by {} at {} ({} ms): {}",
        s(a, "attempt"),
        s(a, "server_id"),
        time(a["started_ms"].as_i64().unwrap_or(0)),
        s(a, "latency_ms"),
        attempt_outcome(a)
    )
}

/// A webhook's deliveries, newest first: the event, the state, the attempts, the last outcome.
pub fn deliveries(items: &[Value], now: i64) -> String {
    let header = [
        "ID",
        "Created",
        "Event type",
        "State",
        "Attempts",
        "Last status",
        "Last error",
    ];
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            let last = d["attempt_log"].as_array().and_then(|a| a.last());
            let mut state = s(d, "state");
            if state == "pending" {
                if let Some(next) = d["next_attempt_ms"].as_i64().filter(|n| *n > now) {
                    state = format!("pending (next {})", until(next, now));
                }
            }
            let error = d["last_error"]
                .as_str()
                .or_else(|| last.and_then(|a| a["error"].as_str()))
                .unwrap_or_default()
                .chars()
                .take(80)
                .collect();
            vec![
                s(d, "id"),
                time(d["created_ms"].as_i64().unwrap_or(0)),
                s(d, "event_type"),
                state,
                s(d, "attempts"),
                last.and_then(|a| a["status_code"].as_i64())
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                error,
            ]
        })
        .collect();
    table(None, &header, &rows).join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, role: Role, up: bool) -> NodeRow {
        let st = pgwarden_core::status::NodeStatus {
            name: name.into(),
            cluster: "main".into(),
            role,
            state: pgwarden_core::status::PgState::Running,
            intent: if role == Role::Primary {
                pgwarden_core::status::Intent::primary()
            } else {
                pgwarden_core::status::Intent::replica_of("n1")
            },
            timeline: Some(3),
            lag_bytes: (role == Role::Replica).then_some(1_048_576),
            system_identifier: Some("7301".into()),
            ..Default::default()
        };
        NodeRow {
            cluster: "main".into(),
            name: name.into(),
            role: if role == Role::Primary {
                "primary"
            } else {
                "replica"
            }
            .into(),
            pg_state: "running".into(),
            agent_up: up,
            last_report_ms: 1_000,
            status: serde_json::to_value(st).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cluster_renders_like_the_agent_list_with_the_agent_column() {
        let c = ClusterDetail {
            name: "main".into(),
            primary: Some("n1".into()),
            paused: true,
            failover_ready: Some(true),
            last_event: None,
            nodes: vec![
                node("n1", Role::Primary, true),
                node("n2", Role::Replica, false),
            ],
        };
        let t = cluster(&c, 121_000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("+ Cluster: main (7301) "), "{t}");
        let cells = |l: &str| {
            l.split('|')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1])[1..7],
            ["Member", "Role", "State", "TL", "Lag in MB", "Agent"]
        );
        assert_eq!(
            cells(lines[3])[1..7],
            ["n1", "Primary", "running", "3", "", "up"]
        );
        assert_eq!(
            cells(lines[4])[1..7],
            [
                "n2",
                "Replica",
                "running",
                "3",
                "1.0",
                "down (last report 2m ago)"
            ]
        );
        assert_eq!(lines[6], " Maintenance mode: on");
        assert_eq!(lines[7], " Failover ready: yes");
    }

    #[test]
    fn a_status_that_cannot_be_read_falls_back_to_the_summary() {
        let n = NodeRow {
            name: "n3".into(),
            role: "replica".into(),
            pg_state: "stopped".into(),
            lag_bytes: None,
            status: json!({"not": "a status"}),
            ..Default::default()
        };
        assert_eq!(
            node_cells(&n),
            ["Replica", "stopped", "", "unknown"].map(String::from)
        );
    }

    #[test]
    fn times_and_lines() {
        assert_eq!(ago(0, 59_000), "59s ago");
        assert_eq!(ago(0, 7_200_000), "2h ago");
        assert_eq!(until(3_600_000, 0), "in 1h");
        assert_eq!(until(0, 1_000), "expired");
        let e = EventRow {
            seq: 1,
            id: "x".into(),
            ts_ms: 0,
            cluster: "main".into(),
            node: "n1".into(),
            kind: "promoted".into(),
            message: "timeline 2".into(),
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01T00:00:00Z  main/n1  promoted  timeline 2"
        );
        let t = join_tokens(
            &[
                json!({"id": "ab", "cluster": "main", "created_by": "admin", "created_ms": 0,
                "expires_ms": 10_000, "used_ms": null, "used_by": null}),
            ],
            0,
        );
        assert!(t.contains("| unused "), "{t}");
        let t =
            users(&[json!({"name": "bob", "role": "operator", "disabled": true, "created_ms": 0})]);
        assert!(t.contains("| bob  | operator | disabled |"), "{t}");
    }

    #[test]
    fn webhooks_and_deliveries() {
        let w = json!({"id": "wh-1", "name": "ops", "format": "pagerduty", "enabled": false,
            "url": "https://h.example/…", "event_types": ["agent_down"], "clusters": [],
            "min_severity": "warning", "routing_key_set": true});
        assert_eq!(webhook_filter(&w), "types agent_down; severity >= warning");
        let t = webhooks(std::slice::from_ref(&w));
        assert!(
            t.contains("| wh-1 | ops  | pagerduty | no      | https://h.example/… |"),
            "{t}"
        );
        let d = webhook(&w);
        assert!(
            d.starts_with("webhook wh-1 (\"ops\"): format pagerduty, disabled\n"),
            "{d}"
        );
        assert!(d.contains("routing key set"), "{d}");
        let all = json!({"event_types": [], "clusters": [], "min_severity": "info"});
        assert_eq!(webhook_filter(&all), "all events");

        let a1 = json!({"attempt": 1, "server_id": "s1", "started_ms": 0, "latency_ms": 7,
            "status_code": 500, "error": null, "response": "upstream down\nmore"});
        let a2 = json!({"attempt": 2, "server_id": "s1", "started_ms": 0, "latency_ms": 3,
            "status_code": null, "error": "connection refused", "response": ""});
        assert_eq!(
            attempt_line(&a1),
            "attempt 1 by s1 at 1970-01-01T00:00:00Z (7 ms): HTTP 500: upstream down"
        );
        assert_eq!(attempt_outcome(&a2), "no answer: connection refused");
        let d = json!({"id": 4, "created_ms": 0, "event_type": "webhook_test",
            "state": "pending", "attempts": 2, "next_attempt_ms": 5_000, "last_error": null,
            "attempt_log": [a1, a2]});
        let t = deliveries(&[d], 0);
        let r: Vec<&str> = t
            .lines()
            .nth(3)
            .unwrap()
            .split('|')
            .map(str::trim)
            .collect();
        assert_eq!(
            r[1..8],
            [
                "4",
                "1970-01-01T00:00:00Z",
                "webhook_test",
                "pending (next in 5s)",
                "2",
                "",
                "connection refused"
            ]
        );
    }
}
