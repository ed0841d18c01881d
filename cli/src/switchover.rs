//! `switchover` and `failover`: the request bodies, what the operator is shown before being
//! asked to confirm, and the confirmation itself (over any reader, so tests can answer it).

use anyhow::{bail, Context, Result};
use pgwarden_core::api::{ClusterView, FailoverRequest, MemberView, SwitchoverRequest};
use std::io::{BufRead, Write};

/// What `--candidate` absent means, in the words shown to the operator.
pub const BEST_REPLICA: &str = "the best replica, chosen by the primary's agent";

/// The operator declined (or did not answer) the confirmation.
#[derive(Debug)]
pub struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aborted")
    }
}

impl std::error::Error for Aborted {}

/// The body of `POST /v1/switchover`. `scheduled` is `now` (any case) or absent for a
/// switchover now; anything else is passed through for the agent to validate as RFC 3339.
pub fn switchover_request(candidate: Option<&str>, scheduled: Option<&str>) -> SwitchoverRequest {
    SwitchoverRequest {
        candidate: candidate.map(str::to_string),
        scheduled_at: scheduled
            .filter(|s| !s.trim().eq_ignore_ascii_case("now"))
            .map(str::to_string),
    }
}

/// The body of `POST /v1/failover`.
pub fn failover_request(candidate: &str) -> FailoverRequest {
    FailoverRequest {
        candidate: candidate.to_string(),
    }
}

/// A confirmation needs someone to answer it: with `--json` (a script), only `--force` will do.
pub fn check_confirmable(json: bool, force: bool) -> Result<()> {
    if json && !force {
        bail!("--json needs --force: there is no one to answer the confirmation");
    }
    Ok(())
}

/// Asks `question` on `out` and reads one line from `input`. Only `y` or `yes` (any case) is
/// a yes; anything else, an empty line or the end of the input is a no.
pub fn confirm(question: &str, input: &mut impl BufRead, out: &mut impl Write) -> Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    let n = input.read_line(&mut answer).context("read the answer")?;
    if n == 0 {
        // End of input: finish the prompt's line.
        writeln!(out)?;
    }
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// The member whose PostgreSQL is a writable primary, if any.
pub fn current_primary(view: &ClusterView) -> Option<&MemberView> {
    view.members
        .iter()
        .find(|m| m.status.as_ref().is_some_and(|s| s.is_writable_primary()))
}

fn member<'a>(view: &'a ClusterView, name: &str) -> Result<&'a MemberView> {
    match view.members.iter().find(|m| m.name == name) {
        Some(m) => Ok(m),
        None => bail!("{name} is not a member of {}", view.cluster),
    }
}

/// One member in a few words: its role, state, timeline and WAL position.
fn describe(m: &MemberView) -> String {
    let Some(s) = &m.status else {
        return format!("{} (unreachable)", m.name);
    };
    let mut parts = vec![crate::list::role(s).to_string(), crate::list::state(s)];
    parts.retain(|p| !p.is_empty());
    if let Some(tl) = s.timeline {
        parts.push(format!("timeline {tl}"));
    }
    if let Some(lsn) = s.wal.received.or(s.wal.replayed).or(s.wal.flush) {
        parts.push(format!("WAL up to {lsn}"));
    }
    if let Some(l) = s.lag_bytes {
        parts.push(format!("lag {:.1} MB", l as f64 / 1_048_576.0));
    }
    format!("{} ({})", m.name, parts.join(", "))
}

/// What a switchover will do, shown before the confirmation. Fails for a candidate that is
/// not a member or is already the primary.
pub fn switchover_plan(view: &ClusterView, req: &SwitchoverRequest) -> Result<String> {
    let primary = current_primary(view);
    let candidate = match &req.candidate {
        Some(c) => {
            let m = member(view, c)?;
            if primary.is_some_and(|p| p.name == *c) {
                bail!("{c} is already the primary");
            }
            Some(m)
        }
        None => None,
    };
    let mut out = Vec::new();
    match primary {
        Some(p) => out.push(format!("Current primary: {}", describe(p))),
        None => out.push(
            "Current primary: none (no member is a writable primary: a switchover needs one; \
             without a healthy primary, see `pgwardenctl failover`)"
                .to_string(),
        ),
    }
    out.push(format!(
        "Candidate:       {}",
        candidate.map_or(BEST_REPLICA.to_string(), describe)
    ));
    out.push(format!(
        "When:            {}",
        req.scheduled_at.as_deref().unwrap_or("now")
    ));
    let old = primary.map_or("the primary", |p| p.name.as_str());
    let new = req.candidate.as_deref().unwrap_or("the candidate");
    out.push(String::new());
    out.push("What happens:".to_string());
    out.push(format!(
        "  1. {old} shuts down cleanly: its clients are disconnected, writes fail until step 3."
    ));
    out.push(format!(
        "  2. {new} receives every WAL record {old} wrote: no acknowledged write is lost."
    ));
    out.push(format!("  3. {new} takes the lease and is promoted."));
    out.push(format!("  4. {old} follows {new} as a replica."));
    Ok(out.join("\n"))
}

/// The question asked before a switchover.
pub fn switchover_question() -> &'static str {
    "Are you sure you want to switch over?"
}

/// What a failover will do, shown before the confirmation. Fails for a candidate that is not
/// a member.
pub fn failover_plan(view: &ClusterView, req: &FailoverRequest) -> Result<String> {
    let c = &req.candidate;
    let candidate = member(view, c)?;
    let mut out = Vec::new();
    let primary = current_primary(view);
    match primary {
        Some(p) => out.push(format!("Current primary: {}", describe(p))),
        None => out.push("Current primary: none (no member is a writable primary)".to_string()),
    }
    out.push(format!("Candidate:       {}", describe(candidate)));
    if let Some(p) = primary {
        out.push(format!(
            "Warning: {} looks like a healthy primary: the agents refuse a failover while a \
             healthy primary holds the lease (use `pgwardenctl switchover`).",
            p.name
        ));
    }
    out.push(String::new());
    out.push("A failover is for when there is no healthy primary:".to_string());
    out.push(format!(
        "  1. {c} takes the lease and is promoted, without waiting for the old primary."
    ));
    out.push(format!(
        "  2. Writes acknowledged by the old primary but not received by {c} may be lost."
    ));
    out.push(format!(
        "  3. When the old primary comes back, its agent makes it follow {c}."
    ));
    Ok(out.join("\n"))
}

/// The question asked before a failover.
pub fn failover_question(candidate: &str) -> String {
    format!("Are you sure you want to fail over to {candidate}?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::status::*;

    fn member(name: &str, status: Option<NodeStatus>) -> MemberView {
        MemberView {
            name: name.into(),
            host: format!("10.0.0.{}", &name[2..]),
            pg_port: 5432,
            api_port: 8443,
            status,
        }
    }

    fn view(primary_writable: bool) -> ClusterView {
        let primary = NodeStatus {
            role: Role::Primary,
            state: if primary_writable {
                PgState::Running
            } else {
                PgState::Stopped
            },
            intent: Intent::primary(),
            timeline: Some(2),
            ..Default::default()
        };
        let replica = NodeStatus {
            role: Role::Replica,
            state: PgState::Running,
            intent: Intent::replica_of("pg1"),
            timeline: Some(2),
            lag_bytes: Some(0),
            ..Default::default()
        };
        ClusterView {
            cluster: "main".into(),
            reported_by: "pg2".into(),
            members: vec![
                member("pg1", Some(primary)),
                member("pg2", Some(replica)),
                member("pg3", None),
            ],
        }
    }

    #[test]
    fn now_means_no_scheduled_time_and_the_candidate_passes_through() {
        let r = switchover_request(Some("pg2"), Some("now"));
        assert_eq!(r.candidate.as_deref(), Some("pg2"));
        assert_eq!(r.scheduled_at, None);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({ "candidate": "pg2" })
        );
        assert_eq!(switchover_request(None, Some("NOW")).scheduled_at, None);
        let r = switchover_request(None, None);
        assert_eq!(serde_json::to_value(&r).unwrap(), serde_json::json!({}));
        let r = switchover_request(None, Some("2026-11-22T10:00:00Z"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({ "scheduled_at": "2026-11-22T10:00:00Z" })
        );
        assert_eq!(
            serde_json::to_value(failover_request("pg3")).unwrap(),
            serde_json::json!({ "candidate": "pg3" })
        );
    }

    #[test]
    fn only_y_or_yes_confirms() {
        let ask = |answer: &str| {
            let mut out = Vec::new();
            let yes = confirm("Go?", &mut answer.as_bytes(), &mut out).unwrap();
            (yes, String::from_utf8(out).unwrap())
        };
        for a in ["y\n", "yes\n", "Y\n", " YES \n", "y"] {
            assert!(ask(a).0, "{a:?}");
        }
        for a in ["n\n", "\n", "", "no\n", "yy\n", "sure\n", "y es\n"] {
            assert!(!ask(a).0, "{a:?}");
        }
        assert_eq!(ask("y\n").1, "Go? [y/N] ");
        // At the end of the input the prompt's line is finished.
        assert_eq!(ask("").1, "Go? [y/N] \n");
        // Only one line is read.
        assert!(!ask("n\ny\n").0);
    }

    #[test]
    fn json_without_force_is_refused() {
        let e = check_confirmable(true, false).unwrap_err().to_string();
        assert!(e.contains("--json needs --force"), "{e}");
        assert!(check_confirmable(true, true).is_ok());
        assert!(check_confirmable(false, false).is_ok());
    }

    #[test]
    fn the_switchover_plan_names_who_when_and_what() {
        let v = view(true);
        let p = switchover_plan(&v, &switchover_request(Some("pg2"), None)).unwrap();
        assert!(p.contains("Current primary: pg1 (Primary, running"), "{p}");
        assert!(p.contains("Candidate:       pg2 (Replica, running"), "{p}");
        assert!(p.contains("When:            now"), "{p}");
        assert!(p.contains("pg1 shuts down cleanly"), "{p}");
        assert!(p.contains("pg2 receives every WAL record"), "{p}");
        assert!(p.contains("takes the lease and is promoted"), "{p}");
        assert!(p.contains("no acknowledged write is lost"), "{p}");
        assert!(p.contains("pg1 follows pg2 as a replica"), "{p}");

        let p =
            switchover_plan(&v, &switchover_request(None, Some("2026-11-22T10:00:00Z"))).unwrap();
        assert!(
            p.contains(&format!("Candidate:       {BEST_REPLICA}")),
            "{p}"
        );
        assert!(p.contains("When:            2026-11-22T10:00:00Z"), "{p}");

        let p = switchover_plan(&view(false), &switchover_request(None, None)).unwrap();
        assert!(p.contains("Current primary: none"), "{p}");
        assert!(p.contains("pgwardenctl failover"), "{p}");
    }

    #[test]
    fn a_switchover_to_a_stranger_or_to_the_primary_is_refused() {
        let v = view(true);
        let e = switchover_plan(&v, &switchover_request(Some("pg9"), None)).unwrap_err();
        assert_eq!(e.to_string(), "pg9 is not a member of main");
        let e = switchover_plan(&v, &switchover_request(Some("pg1"), None)).unwrap_err();
        assert_eq!(e.to_string(), "pg1 is already the primary");
    }

    #[test]
    fn the_failover_plan_warns_about_lost_writes() {
        let p = failover_plan(&view(false), &failover_request("pg2")).unwrap();
        assert!(p.contains("Current primary: none"), "{p}");
        assert!(!p.contains("Warning"), "{p}");
        assert!(p.contains("Candidate:       pg2 (Replica"), "{p}");
        assert!(
            p.contains("A failover is for when there is no healthy primary"),
            "{p}"
        );
        assert!(
            p.contains(
                "Writes acknowledged by the old primary but not received by pg2 may be lost"
            ),
            "{p}"
        );
        assert_eq!(
            failover_question("pg2"),
            "Are you sure you want to fail over to pg2?"
        );
        // A healthy primary is pointed out: the agents will refuse.
        let p = failover_plan(&view(true), &failover_request("pg3")).unwrap();
        assert!(
            p.contains("Warning: pg1 looks like a healthy primary"),
            "{p}"
        );
        assert!(p.contains("Candidate:       pg3 (unreachable)"), "{p}");
        let e = failover_plan(&view(false), &failover_request("pg9")).unwrap_err();
        assert_eq!(e.to_string(), "pg9 is not a member of main");
    }
}
