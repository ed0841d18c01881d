//! `history`: every change of lease holder (bootstrap, failover, switchover, manual failover)
//! as a table like `patronictl history`, then each record in detail: the candidates as the
//! winner saw them and the steps with their times.

use pgwarden_core::candidate::Verdict;
use pgwarden_core::record::{CandidateRecord, ChangeKind, FailoverRecord, History};
use pgwarden_core::timefmt::format_rfc3339;

/// What `history` prints when nothing is recorded.
pub const EMPTY: &str = "no failover or switchover recorded";

fn kind(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Bootstrap => "bootstrap",
        ChangeKind::Failover => "failover",
        ChangeKind::Switchover => "switchover",
        ChangeKind::ManualFailover => "manual failover",
    }
}

/// `pg1 → pg2`, or `none → pg1` for the first lease.
fn holders(r: &FailoverRecord) -> String {
    format!(
        "{} → {}",
        r.old_holder.as_deref().unwrap_or("none"),
        r.new_holder
    )
}

/// Why the old holder lost the lease and why the new one won, as one cell.
fn why(r: &FailoverRecord) -> String {
    [r.lost_because.as_str(), r.won_because.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// When the first step happened, in UTC.
fn started(r: &FailoverRecord) -> String {
    r.steps
        .first()
        .map(|s| format_rfc3339(s.at_ms))
        .unwrap_or_default()
}

/// From the first step to the last: `291 ms`, `3.4 s`.
fn took(r: &FailoverRecord) -> String {
    let (Some(first), Some(last)) = (r.steps.first(), r.steps.last()) else {
        return String::new();
    };
    let ms = last.at_ms.saturating_sub(first.at_ms);
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn tags(c: &CandidateRecord) -> String {
    let mut t = Vec::new();
    if c.nofailover {
        t.push("nofailover".to_string());
    }
    t.push(format!("priority {}", c.failover_priority));
    if c.synchronous {
        t.push("synchronous".into());
    }
    t.join(", ")
}

fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Eligible => "eligible".into(),
        Verdict::Ineligible(why) => format!("ineligible: {why}"),
    }
}

/// One record in detail: holders, candidates, steps with their offsets from the first.
fn detail(r: &FailoverRecord) -> Vec<String> {
    let mut out = vec![format!(
        "Epoch {}: {}, {}{}",
        r.epoch,
        kind(r.kind),
        holders(r),
        match r.steps.first() {
            Some(s) => format!(", {}", format_rfc3339(s.at_ms)),
            None => String::new(),
        }
    )];
    let mut old = Vec::new();
    if !r.lost_because.is_empty() {
        old.push(r.lost_because.clone());
    }
    if let Some(lsn) = r.old_primary_lsn {
        old.push(format!("last reported WAL position {lsn}"));
    }
    out.push(format!(
        "  Old holder: {}{}",
        r.old_holder.as_deref().unwrap_or("none"),
        if old.is_empty() {
            String::new()
        } else {
            format!(" ({})", old.join(", "))
        }
    ));
    out.push(format!(
        "  New holder: {}{}",
        r.new_holder,
        if r.won_because.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.won_because)
        }
    ));
    if r.candidates.is_empty() {
        out.push("  Candidates: none recorded".into());
    } else {
        out.push("  Candidates:".into());
        let rows: Vec<Vec<String>> = r
            .candidates
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.received_lsn
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    c.lag_bytes
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    tags(c),
                    verdict(&c.verdict),
                ]
            })
            .collect();
        let header = ["Member", "Received LSN", "Lag in bytes", "Tags", "Verdict"];
        out.extend(
            crate::list::table(None, &header, &rows)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
    }
    if r.steps.is_empty() {
        out.push("  Steps: none recorded".into());
    } else {
        out.push("  Steps:".into());
        let first = r.steps[0].at_ms as i128;
        let offsets: Vec<String> = r
            .steps
            .iter()
            .map(|s| format!("{:+} ms", s.at_ms as i128 - first))
            .collect();
        let width = offsets.iter().map(String::len).max().unwrap_or(0);
        for (s, offset) in r.steps.iter().zip(&offsets) {
            let mut line = format!("    {offset:>width$} {} ({})", s.step, s.by);
            if !s.detail.is_empty() {
                line.push_str(&format!(": {}", s.detail));
            }
            out.push(line);
        }
    }
    out
}

/// The history as text: a table of every record (oldest first), then the newest `last`
/// records (all without it) in detail.
pub fn render(h: &History, last: Option<usize>) -> String {
    if h.failovers.is_empty() {
        return format!("{EMPTY}\n");
    }
    let rows: Vec<Vec<String>> = h
        .failovers
        .iter()
        .map(|r| {
            vec![
                r.epoch.to_string(),
                started(r),
                kind(r.kind).into(),
                holders(r),
                why(r),
                took(r),
            ]
        })
        .collect();
    let header = ["Epoch", "Time", "Kind", "Holder", "Why", "Took"];
    let mut out = crate::list::table(None, &header, &rows);
    let n = last.unwrap_or(h.failovers.len()).min(h.failovers.len());
    for r in &h.failovers[h.failovers.len() - n..] {
        out.push(String::new());
        out.extend(detail(r));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::record::Step;
    use pgwarden_core::timefmt::parse_rfc3339_ms;
    use pgwarden_core::Lsn;

    fn step(step: &str, at_ms: u64, by: &str, detail: &str) -> Step {
        Step {
            step: step.into(),
            at_ms,
            by: by.into(),
            detail: detail.into(),
        }
    }

    fn candidate(
        name: &str,
        lsn: Option<&str>,
        lag: Option<u64>,
        verdict: Verdict,
    ) -> CandidateRecord {
        CandidateRecord {
            name: name.into(),
            received_lsn: lsn.map(|l| l.parse().unwrap()),
            lag_bytes: lag,
            nofailover: false,
            failover_priority: 1,
            synchronous: false,
            verdict,
        }
    }

    fn history() -> History {
        let t0 = parse_rfc3339_ms("2026-11-22T09:00:00Z").unwrap();
        let t1 = parse_rfc3339_ms("2026-11-22T10:00:00Z").unwrap();
        let mut nofailover = candidate(
            "n3",
            Some("0/5000000"),
            Some(328),
            Verdict::Ineligible("tagged nofailover".into()),
        );
        nofailover.nofailover = true;
        let mut sync = candidate("n2", Some("0/5000148"), Some(0), Verdict::Eligible);
        sync.synchronous = true;
        sync.failover_priority = 2;
        History {
            failovers: vec![
                FailoverRecord {
                    epoch: 1,
                    kind: ChangeKind::Bootstrap,
                    old_holder: None,
                    lost_because: String::new(),
                    old_released: false,
                    new_holder: "n1".into(),
                    won_because: "cluster.initial_primary".into(),
                    candidates: vec![],
                    old_primary_lsn: None,
                    steps: vec![
                        step("lease_acquired", t0, "n1", ""),
                        step("promoted", t0 + 640, "n1", "initdb"),
                    ],
                },
                FailoverRecord {
                    epoch: 2,
                    kind: ChangeKind::Failover,
                    old_holder: Some("n1".into()),
                    lost_because: "lease expired".into(),
                    old_released: false,
                    new_holder: "n2".into(),
                    won_because: "highest failover_priority".into(),
                    candidates: vec![sync, nofailover],
                    old_primary_lsn: Some(Lsn(0x5000148)),
                    steps: vec![
                        step("detected", t1, "n2", "lease of n1 expired"),
                        step("lease_acquired", t1 + 12, "n2", ""),
                        step("promoted", t1 + 3412, "n2", ""),
                    ],
                },
            ],
        }
    }

    #[test]
    fn an_empty_history_says_so() {
        assert_eq!(
            render(&History::default(), None),
            "no failover or switchover recorded\n"
        );
    }

    #[test]
    fn renders_the_table_and_every_record() {
        let t = render(&history(), None);
        let lines: Vec<&str> = t.lines().collect();
        let cells = |l: &str| {
            l.split('|')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1])[1..7],
            ["Epoch", "Time", "Kind", "Holder", "Why", "Took"]
        );
        assert_eq!(
            cells(lines[3])[1..7],
            [
                "1",
                "2026-11-22T09:00:00Z",
                "bootstrap",
                "none → n1",
                "cluster.initial_primary",
                "640 ms"
            ]
        );
        assert_eq!(
            cells(lines[4])[1..7],
            [
                "2",
                "2026-11-22T10:00:00Z",
                "failover",
                "n1 → n2",
                "lease expired; highest failover_priority",
                "3.4 s"
            ]
        );
        // Every line of the table has the same width.
        let width = lines[0].chars().count();
        assert!(lines[..6].iter().all(|l| l.chars().count() == width), "{t}");

        let expected_bootstrap = [
            "",
            "Epoch 1: bootstrap, none → n1, 2026-11-22T09:00:00Z",
            "  Old holder: none",
            "  New holder: n1 (cluster.initial_primary)",
            "  Candidates: none recorded",
            "  Steps:",
            "      +0 ms lease_acquired (n1)",
            "    +640 ms promoted (n1): initdb",
            "",
        ]
        .join("\n");
        assert!(t.contains(&expected_bootstrap), "{t}");

        let failover = &t[t.find("Epoch 2:").unwrap()..];
        let lines: Vec<&str> = failover.lines().collect();
        assert_eq!(lines[0], "Epoch 2: failover, n1 → n2, 2026-11-22T10:00:00Z");
        assert_eq!(
            lines[1],
            "  Old holder: n1 (lease expired, last reported WAL position 0/5000148)"
        );
        assert_eq!(lines[2], "  New holder: n2 (highest failover_priority)");
        assert_eq!(lines[3], "  Candidates:");
        assert_eq!(
            cells(lines[5])[1..6],
            ["Member", "Received LSN", "Lag in bytes", "Tags", "Verdict"]
        );
        assert_eq!(
            cells(lines[7])[1..6],
            [
                "n2",
                "0/5000148",
                "0",
                "priority 2, synchronous",
                "eligible"
            ]
        );
        assert_eq!(
            cells(lines[8])[1..6],
            [
                "n3",
                "0/5000000",
                "328",
                "nofailover, priority 1",
                "ineligible: tagged nofailover"
            ]
        );
        assert!(lines[4].starts_with("  +---"), "{failover}");
        assert_eq!(
            lines[10..],
            [
                "  Steps:",
                "       +0 ms detected (n2): lease of n1 expired",
                "      +12 ms lease_acquired (n2)",
                "    +3412 ms promoted (n2)",
            ]
        );
    }

    #[test]
    fn last_limits_the_details_to_the_newest() {
        let t = render(&history(), Some(1));
        assert!(t.contains("| 1     |"), "the table keeps every record: {t}");
        assert!(!t.contains("Epoch 1:"), "{t}");
        assert!(t.contains("Epoch 2:"), "{t}");
        let t = render(&history(), Some(0));
        assert_eq!(t.lines().count(), 6, "the table alone: {t}");
        let t = render(&history(), Some(5));
        assert!(t.contains("Epoch 1:") && t.contains("Epoch 2:"), "{t}");
    }

    #[test]
    fn unknown_positions_and_missing_steps() {
        let mut h = history();
        h.failovers.truncate(1);
        let r = &mut h.failovers[0];
        r.kind = ChangeKind::ManualFailover;
        r.old_holder = Some("n2".into());
        r.candidates = vec![candidate("n1", None, None, Verdict::Eligible)];
        r.steps.clear();
        let t = render(&h, None);
        assert!(t.contains("| manual failover | n2 → n1 "), "{t}");
        assert!(
            t.contains("| n1     | unknown      | unknown      |"),
            "{t}"
        );
        assert!(t.contains("Epoch 1: manual failover, n2 → n1\n"), "{t}");
        assert!(t.ends_with("  Steps: none recorded\n"), "{t}");
    }
}
