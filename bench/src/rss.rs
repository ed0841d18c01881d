//! The agents' memory: the peak resident set of every `pgwarden-agent` process of the lab,
//! read from `/proc/<pid>/status`. A process belongs to the lab when its command line passes
//! one of the lab's node configuration files (`--config <lab dir>/<node>/agent.toml`); no other
//! process is looked at beyond its command line, and none is ever signalled.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `(node, pid)` of the lab's running agents.
pub fn lab_agents(configs: &[(String, PathBuf)]) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with(b"pgwarden-agent"));
        if !is_agent {
            continue;
        }
        for w in args.windows(2) {
            if w[0] != b"--config" {
                continue;
            }
            if let Some((node, _)) = configs
                .iter()
                .find(|(_, p)| p.as_os_str().as_encoded_bytes() == w[1])
            {
                out.push((node.clone(), pid));
            }
        }
    }
    out
}

/// `(VmRSS, VmHWM)` of a process in KiB.
pub fn memory_kib(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:").unwrap_or(0)))
}

/// Samples the lab's agents every half second until stopped; the result is the peak per
/// node in KiB, over every agent process that node had (an agent restarted by a scenario is
/// a new process).
pub struct RssSampler {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<BTreeMap<String, u64>>>,
}

impl RssSampler {
    pub fn start(configs: Vec<(String, PathBuf)>) -> RssSampler {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut peak: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                sample(&configs, &mut peak);
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            sample(&configs, &mut peak);
            peak
        });
        RssSampler {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn finish(mut self) -> BTreeMap<String, u64> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => BTreeMap::new(),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn sample(configs: &[(String, PathBuf)], peak: &mut BTreeMap<String, u64>) {
    for (node, pid) in lab_agents(configs) {
        if let Some((rss, hwm)) = memory_kib(pid) {
            let p = peak.entry(node).or_default();
            *p = (*p).max(rss).max(hwm);
        }
    }
}
