//! The figures: a line per run as it finishes, a table per scenario at the end, and the same as
//! JSON.

use crate::scenario::{RunResult, Scenario};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub runs: usize,
    pub scenarios: Vec<String>,
    pub interval_ms: u64,
    pub timeout_secs: u64,
    pub warmup_ms: u64,
    pub cooldown_ms: u64,
    pub nodes: usize,
    pub loop_wait: String,
    pub lab: String,
    pub agent_bin: String,
    pub config_patch: Option<serde_json::Value>,
    /// Writes went only through the VIP.
    pub vip: bool,
    pub cpus: usize,
    pub started_unix: u64,
}

/// One scenario's runs, summed up.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub runs: usize,
    pub failures: usize,
    /// Over every run that produced a probe report, failed runs included.
    pub median_gap_ms: Option<u64>,
    pub max_gap_ms: Option<u64>,
    pub lost_acknowledged: u64,
    pub split_brain_writes: u64,
    pub primary_changes: usize,
    pub expected_primary_change: bool,
    pub median_writable_after_ms: Option<u64>,
    pub median_rejoin_ms: Option<u64>,
    pub max_rejoin_ms: Option<u64>,
    pub max_agent_rss_kib: Option<u64>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Output {
    pub settings: Settings,
    pub interrupted: bool,
    pub agent_version: Option<String>,
    pub summary: Vec<Summary>,
    pub runs: Vec<RunResult>,
}

impl Output {
    pub fn new(
        settings: Settings,
        scenarios: &[Scenario],
        runs: Vec<RunResult>,
        interrupted: bool,
    ) -> Output {
        let summary = scenarios
            .iter()
            .map(|s| summarize(*s, &runs))
            .filter(|s| s.runs > 0)
            .collect();
        Output {
            settings,
            interrupted,
            agent_version: runs.iter().find_map(|r| r.agent_version.clone()),
            summary,
            runs,
        }
    }
}

pub fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    })
}

fn summarize(s: Scenario, all: &[RunResult]) -> Summary {
    let runs: Vec<&RunResult> = all.iter().filter(|r| r.scenario == s.name()).collect();
    let gaps: Vec<u64> = runs.iter().filter_map(|r| r.max_gap_ms).collect();
    let rejoins: Vec<u64> = runs.iter().filter_map(|r| r.rejoin_ms).collect();
    Summary {
        scenario: s.name().to_string(),
        runs: runs.len(),
        failures: runs.iter().filter(|r| !r.ok).count(),
        median_gap_ms: median(gaps.clone()),
        max_gap_ms: gaps.iter().copied().max(),
        lost_acknowledged: runs.iter().filter_map(|r| r.lost_acknowledged).sum(),
        split_brain_writes: runs.iter().filter_map(|r| r.split_brain_writes).sum(),
        primary_changes: runs
            .iter()
            .filter(|r| r.primary_changed == Some(true))
            .count(),
        expected_primary_change: s.expects_new_primary(),
        median_writable_after_ms: median(runs.iter().filter_map(|r| r.writable_after_ms).collect()),
        median_rejoin_ms: median(rejoins.clone()),
        max_rejoin_ms: rejoins.iter().copied().max(),
        max_agent_rss_kib: runs
            .iter()
            .flat_map(|r| r.agent_peak_rss_kib.values().copied())
            .max(),
        errors: runs
            .iter()
            .filter_map(|r| r.error.as_ref().map(|e| format!("run {}: {e}", r.run)))
            .collect(),
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map(|x| format!("{x} ms")).unwrap_or_else(|| "-".into())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

/// The line printed when a run ends.
pub fn run_line(r: &RunResult) -> String {
    let mut s = format!(
        "{} #{}: {}",
        r.scenario,
        r.run,
        if r.ok { "ok" } else { "FAILED" }
    );
    if let Some(g) = r.max_gap_ms {
        s.push_str(&format!(
            " | gap {g} ms, lost {}, split-brain {}",
            r.lost_acknowledged.unwrap_or(0),
            r.split_brain_writes.unwrap_or(0)
        ));
    }
    s.push_str(&format!(
        " | primary {} -> {}{}",
        r.primary_before.as_deref().unwrap_or("?"),
        r.primary_after.as_deref().unwrap_or("?"),
        match r.primary_changed {
            Some(true) => " (changed)",
            Some(false) => " (same)",
            None => "",
        }
    ));
    if let Some(w) = r.writable_after_ms {
        s.push_str(&format!(" | writable +{w} ms"));
    }
    if let Some(t) = r.settled_after_ms {
        s.push_str(&format!(", settled +{t} ms"));
    }
    if let Some(j) = r.rejoin_ms {
        s.push_str(&format!(", rejoin {j} ms"));
    }
    if !r.agent_peak_rss_kib.is_empty() {
        let rss: Vec<String> = r
            .agent_peak_rss_kib
            .iter()
            .map(|(n, k)| format!("{n} {}", mib(*k)))
            .collect();
        s.push_str(&format!(" | agent RSS {}", rss.join(", ")));
    }
    for n in &r.notes {
        s.push_str(&format!("\n    note: {n}"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\n    error: {e}"));
    }
    s
}

/// The end-of-benchmark table, one row per scenario, then each failed run's error.
pub fn table(out: &Output) -> String {
    let header = [
        "scenario",
        "runs",
        "failed",
        "gap median",
        "gap max",
        "lost acked",
        "split-brain",
        "primary changed",
        "writable median",
        "rejoin median",
        "agent RSS max",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for s in &out.summary {
        rows.push(vec![
            s.scenario.clone(),
            s.runs.to_string(),
            s.failures.to_string(),
            opt_ms(s.median_gap_ms),
            opt_ms(s.max_gap_ms),
            s.lost_acknowledged.to_string(),
            s.split_brain_writes.to_string(),
            format!(
                "{}/{} ({})",
                s.primary_changes,
                s.runs,
                if s.expected_primary_change {
                    "expect all"
                } else {
                    "expect 0"
                }
            ),
            opt_ms(s.median_writable_after_ms),
            opt_ms(s.median_rejoin_ms),
            s.max_agent_rss_kib.map(mib).unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c == 0 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            text.push_str(&"-".repeat(total));
            text.push('\n');
        }
    }
    let errors: Vec<String> = out
        .summary
        .iter()
        .flat_map(|s| s.errors.iter().map(move |e| format!("{} {e}", s.scenario)))
        .collect();
    if !errors.is_empty() {
        text.push_str("\nfailed runs:\n");
        for e in errors {
            text.push_str(&format!("  {e}\n"));
        }
    }
    if out.interrupted {
        text.push_str("\n(interrupted: only the runs that finished are counted)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![5]), Some(5));
        assert_eq!(median(vec![9, 1, 5]), Some(5));
        assert_eq!(median(vec![4, 1, 3, 2]), Some(2));
    }
}
