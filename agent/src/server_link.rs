//! Reports to the control plane: every `report_interval` the agent pushes its status, the
//! events the server has not acknowledged yet, its newest failover record's epoch and the
//! commands whose state changed, to `POST /api/v1/agent/report` over mutual TLS.
//!
//! `<state_dir>/events.jsonl` is the durable buffer: `<state_dir>/server.cursor` holds the byte
//! offset of the first line the server has not acknowledged, and moves past exactly the lines
//! the server says it stored, so an event is neither lost nor skipped across failed reports and
//! restarts (the server stores each event id once). The acknowledgement also carries the
//! revoked certificate fingerprints, kept in `<state_dir>/tls/revoked.json`.

use crate::agent::Shared;
use crate::commands::Commands;
use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::config::{AgentConfig, Member, TlsSection};
use pgwarden_core::control::{AgentReport, ReportAck, REPORT_EVENTS_MAX};
use pgwarden_core::event::Event;
use pgwarden_core::status::NodeStatus;
use std::collections::HashSet;
use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The shortest and longest report intervals the agent accepts from the server.
const INTERVAL_MIN: Duration = Duration::from_millis(100);
const INTERVAL_MAX: Duration = Duration::from_secs(3600);

/// `<state_dir>/server.cursor`.
pub fn cursor_file(state_dir: &Path) -> PathBuf {
    state_dir.join("server.cursor")
}

/// `<state_dir>/tls/revoked.json`.
pub fn revoked_file(state_dir: &Path) -> PathBuf {
    crate::join::tls_dir(state_dir).join("revoked.json")
}

/// Where and how often to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port`, no trailing `/`.
    pub url: String,
    pub interval: Duration,
}

/// The control plane from `[server]`, else from `<state_dir>/server.json` (written by `join`);
/// `None` when neither says.
pub fn target(cfg: &AgentConfig) -> Result<Option<Target>> {
    if let Some(s) = &cfg.server {
        return Ok(Some(Target {
            url: s.base_url().to_string(),
            interval: s.report_interval.0,
        }));
    }
    let file = crate::join::read_server_file(Path::new(&cfg.node.state_dir))?;
    Ok(file.map(|f| Target {
        url: f.url.trim_end_matches('/').to_string(),
        interval: Duration::from_secs(2),
    }))
}

/// Where the server reaches a member's API: `https://host:api_port`.
pub fn api_url(m: &Member) -> String {
    if m.host.contains(':') && !m.host.starts_with('[') {
        format!("https://[{}]:{}", m.host, m.api_port)
    } else {
        format!("https://{}:{}", m.host, m.api_port)
    }
}

/// Events read from the log from an offset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// The offset the batch was read from.
    pub start: u64,
    pub events: Vec<Event>,
    /// Where each event's line starts.
    pub starts: Vec<u64>,
    /// Past the last complete line read (events and unreadable lines).
    pub end: u64,
    /// Complete lines read, unreadable ones included.
    pub lines: usize,
    /// Lines that are not events: their offset and why.
    pub bad: Vec<(u64, String)>,
}

impl Batch {
    /// The offset past the first `stored` events (and any unreadable line before the next
    /// one); past every line read when all were stored.
    pub fn offset_after(&self, stored: usize) -> u64 {
        self.starts.get(stored).copied().unwrap_or(self.end)
    }
}

/// Reads at most `max` complete lines (ending in `\n`) from `r`, which is at `offset`; a last
/// line without its `\n` is being written and is left for later. A line that is not an event
/// is skipped but counted, so the cursor can move past it.
pub fn read_batch<R: BufRead>(mut r: R, offset: u64, max: usize) -> std::io::Result<Batch> {
    let mut b = Batch {
        start: offset,
        end: offset,
        ..Batch::default()
    };
    let mut line = Vec::new();
    while b.lines < max {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let at = b.end;
        b.end += n as u64;
        b.lines += 1;
        match serde_json::from_slice::<Event>(&line) {
            Ok(ev) => {
                b.events.push(ev);
                b.starts.push(at);
            }
            Err(e) => b.bad.push((at, e.to_string())),
        }
    }
    Ok(b)
}

/// Reads a batch from the event log at `cursor`. A missing log is empty; a log shorter than
/// the cursor was replaced, and is read from its start (`Ok((batch, true))`).
pub fn read_events(path: &Path, cursor: u64, max: usize) -> Result<(Batch, bool)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                Batch {
                    start: cursor,
                    end: cursor,
                    ..Batch::default()
                },
                false,
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let len = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let (offset, reset) = if cursor > len {
        (0, true)
    } else {
        (cursor, false)
    };
    f.seek(std::io::SeekFrom::Start(offset))
        .with_context(|| format!("seek in {}", path.display()))?;
    let b = read_batch(std::io::BufReader::new(f), offset, max)
        .with_context(|| format!("read {}", path.display()))?;
    Ok((b, reset))
}

/// The saved cursor; 0 when there is none (or it cannot be read).
pub fn load_cursor(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(t) => t.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "unreadable event cursor; delivering the event log from its start");
            0
        }),
        Err(_) => 0,
    }
}

pub fn save_cursor(path: &Path, offset: u64) -> Result<()> {
    crate::sys::write_durable(path, format!("{offset}\n").as_bytes(), 0o644)
}

/// The revoked fingerprints saved from the last acknowledgement; empty when none.
pub fn load_revoked(path: &Path) -> HashSet<String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice::<Vec<String>>(&b).map_or_else(
            |e| {
                tracing::warn!(error = %e, path = %path.display(), "unreadable revocation list");
                HashSet::new()
            },
            |v| v.into_iter().collect(),
        ),
        Err(_) => HashSet::new(),
    }
}

pub fn save_revoked(path: &Path, set: &HashSet<String>) -> Result<()> {
    let mut v: Vec<&String> = set.iter().collect();
    v.sort();
    let text = serde_json::to_vec_pretty(&v).context("encode the revocation list")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    crate::sys::write_durable(path, &text, 0o644)
}

/// Fingerprints in the form the TLS listener compares (`AB:CD:…`).
pub fn revoked_set(list: &[String]) -> HashSet<String> {
    list.iter()
        .map(|f| crate::join::normalize_fingerprint(f).unwrap_or_else(|| f.trim().to_uppercase()))
        .collect()
}

/// Whether to log a report failure or a recovery: once per outage, not at every attempt.
#[derive(Clone, Debug, Default)]
pub struct Outage {
    down: bool,
}

impl Outage {
    /// A failed report: true for the first one of an outage.
    pub fn failed(&mut self) -> bool {
        !std::mem::replace(&mut self.down, true)
    }
    /// A successful report: true when it ends an outage.
    pub fn recovered(&mut self) -> bool {
        std::mem::replace(&mut self.down, false)
    }
}

/// What one report did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub events_sent: usize,
    pub events_stored: usize,
    /// The batch was full and all stored: more events wait.
    pub more: bool,
    /// The interval the server asked for.
    pub interval: Option<Duration>,
}

/// The connection to the control plane and the delivery state.
pub struct Link {
    url: String,
    http: reqwest::Client,
    cluster: String,
    node: String,
    api_url: String,
    events_path: PathBuf,
    cursor_path: PathBuf,
    revoked_path: PathBuf,
    cursor: u64,
    revoked: crate::tls::Revoked,
    /// The command table's revision the server acknowledged.
    commands_acked: u64,
    /// Unreadable event lines up to here were already logged.
    warned_until: Option<u64>,
}

impl Link {
    /// A link for `cfg`'s node to `url`, with the node's certificate (`tls`).
    pub fn new(
        cfg: &AgentConfig,
        url: &str,
        tls: &TlsSection,
        revoked: crate::tls::Revoked,
    ) -> Result<Link> {
        let http = crate::tls::client(
            &tls.ca_file,
            Some((&tls.cert_file, &tls.key_file)),
            Duration::from_secs(5),
        )
        .context("the HTTPS client for the control plane")?;
        let state_dir = Path::new(&cfg.node.state_dir);
        let cursor_path = cursor_file(state_dir);
        Ok(Link {
            url: url.trim_end_matches('/').to_string(),
            http,
            cluster: cfg.cluster.name.clone(),
            node: cfg.node.name.clone(),
            api_url: api_url(cfg.me()),
            events_path: state_dir.join("events.jsonl"),
            cursor: load_cursor(&cursor_path),
            cursor_path,
            revoked_path: revoked_file(state_dir),
            revoked,
            commands_acked: 0,
            warned_until: None,
        })
    }

    /// The offset of the first unacknowledged event line.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Sends one report; on success applies the acknowledgement (cursor, revocations). On
    /// failure nothing changes and the same events go again next time.
    pub async fn push(
        &mut self,
        status: NodeStatus,
        history_epoch: Option<u64>,
        commands: &Commands,
    ) -> Result<Pushed> {
        let (batch, reset) = read_events(&self.events_path, self.cursor, REPORT_EVENTS_MAX)?;
        if reset {
            tracing::warn!(
                cursor = self.cursor,
                path = %self.events_path.display(),
                "the event log is shorter than the delivery cursor (replaced?): delivering it from its start"
            );
            self.cursor = 0;
        }
        for (at, why) in &batch.bad {
            if self.warned_until.is_none_or(|w| *at >= w) {
                tracing::warn!(offset = at, error = %why, path = %self.events_path.display(), "skipping a line of the event log that is not an event");
            }
        }
        if !batch.bad.is_empty() {
            self.warned_until = Some(batch.end);
        }
        let (changed, rev) = commands.changed_since(self.commands_acked);
        let report = AgentReport {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_url: self.api_url.clone(),
            status,
            events: batch.events.clone(),
            history_epoch,
            commands: changed,
        };
        let url = format!("{}/api/v1/agent/report", self.url);
        let r = self
            .http
            .post(&url)
            .json(&report)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let code = r.status();
        let body = r.text().await.with_context(|| format!("read {url}"))?;
        if !code.is_success() {
            bail!(
                "POST {url} answered {code}: {}",
                crate::join::problem_detail(&body)
            );
        }
        let ack: ReportAck = serde_json::from_str(&body)
            .map_err(|e| anyhow!("POST {url}: not a report acknowledgement: {e}"))?;
        let stored = ack.events_stored.min(batch.events.len());
        let next = batch.offset_after(stored);
        if next != self.cursor {
            self.cursor = next;
            if let Err(e) = save_cursor(&self.cursor_path, next) {
                // Only costs a redelivery after a restart: the server stores each id once.
                tracing::warn!(error = %format!("{e:#}"), "cannot save the event cursor");
            }
        }
        self.commands_acked = rev;
        let revoked = revoked_set(&ack.revoked);
        if self.revoked.replace(revoked.clone()) {
            tracing::info!(
                revoked = revoked.len(),
                "the control plane's revocation list changed"
            );
            if let Err(e) = save_revoked(&self.revoked_path, &revoked) {
                tracing::warn!(error = %format!("{e:#}"), "cannot save the revocation list");
            }
        }
        let interval = (ack.report_interval_ms > 0).then(|| {
            Duration::from_millis(ack.report_interval_ms).clamp(INTERVAL_MIN, INTERVAL_MAX)
        });
        Ok(Pushed {
            events_sent: batch.events.len(),
            events_stored: stored,
            more: batch.lines >= REPORT_EVENTS_MAX && stored == batch.events.len(),
            interval,
        })
    }
}

/// The newest failover record's epoch in the replicated state.
fn history_epoch(shared: &Shared) -> Option<u64> {
    shared
        .consensus
        .sm
        .state()
        .failovers
        .iter()
        .map(|r| r.epoch)
        .max()
}

/// Reports to `target` until the process ends.
pub async fn run(shared: Arc<Shared>, target: Target, tls: TlsSection) {
    let mut interval = target.interval;
    let mut outage = Outage::default();
    let mut link: Option<Link> = None;
    tracing::info!(url = %target.url, every = ?interval, "reporting to the control plane");
    loop {
        let res = match &mut link {
            Some(l) => Ok(l),
            None => Link::new(&shared.cfg, &target.url, &tls, shared.revoked.clone())
                .map(|l| link.insert(l)),
        };
        let res = match res {
            Ok(l) => {
                l.push(shared.status(), history_epoch(&shared), &shared.commands)
                    .await
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(p) => {
                if outage.recovered() {
                    tracing::info!(url = %target.url, "reporting to the control plane again");
                }
                if let Some(i) = p.interval.filter(|i| *i != interval) {
                    tracing::info!(every = ?i, "report interval set by the control plane");
                    interval = i;
                }
                if p.more {
                    continue;
                }
            }
            Err(e) => {
                if outage.failed() {
                    tracing::warn!(
                        url = %target.url,
                        error = %format!("{e:#}"),
                        "cannot report to the control plane; retrying every {interval:?} (logged again when it recovers)"
                    );
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> Event {
        Event {
            id: format!("n1-1-{i}"),
            ts_ms: i,
            cluster: "main".into(),
            node: "n1".into(),
            kind: "k".into(),
            message: format!("event {i}"),
        }
    }

    fn line(i: u64) -> String {
        format!("{}\n", serde_json::to_string(&ev(i)).unwrap())
    }

    fn read(text: &str, offset: u64, max: usize) -> Batch {
        read_batch(
            std::io::Cursor::new(&text.as_bytes()[offset as usize..]),
            offset,
            max,
        )
        .unwrap()
    }

    fn ids(b: &Batch) -> Vec<u64> {
        b.events.iter().map(|e| e.ts_ms).collect()
    }

    #[test]
    fn a_partial_last_line_waits() {
        let full = line(1) + &line(2);
        let partial = format!("{full}{}", &line(3)[..20]);
        let b = read(&partial, 0, 10);
        assert_eq!(ids(&b), [1, 2]);
        assert_eq!(b.end, full.len() as u64);
        assert_eq!(b.offset_after(2), full.len() as u64);
        // Without its newline even a complete JSON object waits.
        let b = read(&format!("{full}{}", line(3).trim_end()), 0, 10);
        assert_eq!(ids(&b), [1, 2]);
    }

    #[test]
    fn at_most_n_lines_from_an_offset() {
        let text: String = (1..=6).map(line).collect();
        let second = line(1).len() as u64;
        let b = read(&text, second, 3);
        assert_eq!(ids(&b), [2, 3, 4]);
        assert_eq!(b.start, second);
        assert_eq!(b.starts[0], second);
        assert_eq!(b.lines, 3);
        let b = read(&text, b.end, 3);
        assert_eq!(ids(&b), [5, 6]);
        assert_eq!(b.end, text.len() as u64);
        let b = read(&text, text.len() as u64, 3);
        assert!(b.events.is_empty());
        assert_eq!(b.offset_after(0), text.len() as u64);
    }

    #[test]
    fn the_cursor_moves_past_exactly_the_stored_events() {
        let text: String = (1..=4).map(line).collect();
        let b = read(&text, 0, 10);
        assert_eq!(b.offset_after(0), 0);
        assert_eq!(b.offset_after(1), line(1).len() as u64);
        assert_eq!(ids(&read(&text, b.offset_after(1), 10)), [2, 3, 4]);
        assert_eq!(ids(&read(&text, b.offset_after(3), 10)), [4]);
        assert_eq!(b.offset_after(4), text.len() as u64);
        assert_eq!(b.offset_after(99), text.len() as u64);
    }

    #[test]
    fn unreadable_lines_are_skipped_but_counted() {
        let text = format!("{}not json\n{}{{\"id\":1}}\n", line(1), line(2));
        let b = read(&text, 0, 10);
        assert_eq!(ids(&b), [1, 2]);
        assert_eq!(b.lines, 4);
        assert_eq!(b.bad.len(), 2);
        assert_eq!(b.bad[0].0, line(1).len() as u64);
        // Storing the first event moves past the bad line too (to the second event)…
        assert_eq!(ids(&read(&text, b.offset_after(1), 10)), [2]);
        // …and storing both moves past the trailing bad line: nothing is stuck.
        assert_eq!(b.offset_after(2), text.len() as u64);
        let only_bad = "garbage\n";
        let b = read(only_bad, 0, 10);
        assert!(b.events.is_empty());
        assert_eq!(b.offset_after(0), only_bad.len() as u64);
        // Bad lines count against the limit.
        let b = read(&text, 0, 2);
        assert_eq!((ids(&b), b.lines), (vec![1], 2));
    }

    #[test]
    fn a_restart_resumes_at_the_saved_cursor() {
        let dir = std::env::temp_dir().join(format!("pgwarden-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("events.jsonl");
        let cur = cursor_file(&dir);
        assert_eq!(load_cursor(&cur), 0);
        let (b, reset) = read_events(&log, 0, 10).unwrap();
        assert!(b.events.is_empty() && !reset);
        std::fs::write(&log, (1..=5).map(line).collect::<String>()).unwrap();
        let (b, _) = read_events(&log, load_cursor(&cur), 2).unwrap();
        assert_eq!(ids(&b), [1, 2]);
        save_cursor(&cur, b.offset_after(2)).unwrap();
        // A new process: same files.
        let (b, reset) = read_events(&log, load_cursor(&cur), 10).unwrap();
        assert!(!reset);
        assert_eq!(ids(&b), [3, 4, 5]);
        // A log replaced by a shorter one is read from its start.
        std::fs::write(&log, line(9)).unwrap();
        let (b, reset) = read_events(&log, load_cursor(&cur), 10).unwrap();
        assert!(reset);
        assert_eq!((ids(&b), b.start), (vec![9], 0));
        std::fs::write(&cur, "garbage").unwrap();
        assert_eq!(load_cursor(&cur), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn revocations_are_normalised_and_kept() {
        let fp = "ab".repeat(32);
        let set = revoked_set(&[fp.clone(), "odd".into()]);
        assert!(set.contains(&crate::join::normalize_fingerprint(&fp).unwrap()));
        assert!(set.contains("ODD"));
        let dir = std::env::temp_dir().join(format!("pgwarden-revoked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = revoked_file(&dir);
        assert!(load_revoked(&path).is_empty());
        save_revoked(&path, &set).unwrap();
        assert_eq!(load_revoked(&path), set);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_outage_is_logged_once_and_its_end_once() {
        let mut o = Outage::default();
        assert!(!o.recovered());
        assert!(o.failed());
        assert!(!o.failed());
        assert!(!o.failed());
        assert!(o.recovered());
        assert!(!o.recovered());
        assert!(o.failed());
    }

    #[test]
    fn api_urls_bracket_ipv6() {
        let m = |host: &str| Member {
            name: "n1".into(),
            host: host.into(),
            pg_port: 5432,
            health_port: 8008,
            api_port: 8443,
            witness: false,
            instance_id: None,
        };
        assert_eq!(api_url(&m("10.0.0.1")), "https://10.0.0.1:8443");
        assert_eq!(api_url(&m("db1.example")), "https://db1.example:8443");
        assert_eq!(api_url(&m("fd00::1")), "https://[fd00::1]:8443");
    }
}
