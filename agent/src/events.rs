//! The node's event log: appended to `<state_dir>/events.jsonl` (the durable buffer the
//! control-plane reports deliver from, `server_link`) and the newest ones kept in memory for
//! the API.

use crate::sys::now_ms;
use pgwarden_core::event::Event;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct EventLog {
    cluster: String,
    node: String,
    boot: u64,
    path: PathBuf,
    inner: Mutex<(u64, VecDeque<Event>)>,
}

const KEEP: usize = 500;

impl EventLog {
    pub fn new(cluster: &str, node: &str, path: PathBuf) -> EventLog {
        EventLog {
            cluster: cluster.into(),
            node: node.into(),
            boot: now_ms(),
            path,
            inner: Mutex::new((0, VecDeque::new())),
        }
    }

    /// Records an event and logs it.
    pub fn record(&self, kind: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(event = kind, "{message}");
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        g.0 += 1;
        let ev = Event {
            id: format!("{}-{}-{}", self.node, self.boot, g.0),
            ts_ms: now_ms(),
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            kind: kind.into(),
            message,
        };
        if let Ok(line) = serde_json::to_string(&ev) {
            let res = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = res {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot append event");
            }
        }
        g.1.push_back(ev);
        while g.1.len() > KEEP {
            g.1.pop_front();
        }
    }

    pub fn recent(&self) -> Vec<Event> {
        self.inner
            .lock()
            .map(|g| g.1.iter().cloned().collect())
            .unwrap_or_default()
    }
}
