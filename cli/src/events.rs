//! `events`: the server's event log page by page (following `next_cursor`), and `--follow`,
//! the live stream (`GET /api/v1/events/stream`, Server-Sent Events) with reconnection from
//! the last event id.

use crate::server::{check, EventRow, Server};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

/// Events asked for per page.
const PAGE: usize = 100;

/// Which events: the filters of `GET /api/v1/events` and of the stream.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub types: Vec<String>,
    /// RFC 3339 or milliseconds since the epoch (a duration was turned into one already).
    pub since: Option<String>,
}

impl Filter {
    fn query(&self, with_since: bool) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(c) = &self.cluster {
            q.push(("cluster", c.clone()));
        }
        if let Some(n) = &self.node {
            q.push(("node", n.clone()));
        }
        if !self.types.is_empty() {
            q.push(("type", self.types.join(",")));
        }
        if let (true, Some(s)) = (with_since, &self.since) {
            q.push(("since", s.clone()));
        }
        q
    }
}

/// `--since`: a duration such as `1h` means that long ago; anything else (RFC 3339,
/// milliseconds) goes to the server as written, which checks it.
pub fn since_arg(s: &str, now_ms: i64) -> String {
    match pgwarden_core::duration::parse_duration(s.trim()) {
        Ok(d) if !s.trim().chars().all(|c| c.is_ascii_digit()) => {
            (now_ms - d.as_millis() as i64).max(0).to_string()
        }
        _ => s.trim().to_string(),
    }
}

/// Reads up to `limit` events, oldest first, page by page; calls `each` with every event and
/// its JSON as it arrives.
pub async fn page_through(
    server: &Server,
    filter: &Filter,
    limit: usize,
    mut each: impl FnMut(&EventRow, &Value),
) -> Result<()> {
    let mut cursor: Option<String> = None;
    let mut got = 0usize;
    while got < limit {
        let mut q = filter.query(true);
        q.push(("limit", PAGE.min(limit - got).to_string()));
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = server.get_query("/api/v1/events", &q).await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for raw in &items {
            let e: EventRow = serde_json::from_value(raw.clone()).context("read an event")?;
            each(&e, raw);
            got += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) if !items.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(())
}

/// One Server-Sent Events message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Splits a Server-Sent Events byte stream into messages, across chunk boundaries.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Takes the next chunk; returns the messages it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || self.event.is_some() {
                    out.push(SseMessage {
                        id: self.id.take(),
                        event: self.event.take(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                self.id = None;
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the keep-alive
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => self.id = Some(value.to_string()),
                "event" => self.event = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// Opens the live stream, after `last_id` when given (`Last-Event-ID`).
pub async fn open_stream(
    server: &Server,
    filter: &Filter,
    last_id: Option<&str>,
) -> Result<reqwest::Response> {
    let url = server.url("/api/v1/events/stream");
    let mut req = server
        .stream_client()?
        .get(&url)
        .query(&filter.query(false))
        .bearer_auth(server.token()?)
        .header("Accept", "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(resp);
    }
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    check(status, v)?;
    anyhow::bail!("GET {url}: {status}")
}

/// Prints every event of the stream until the process is stopped, skipping `seen` seqs.
/// `first` is a stream opened before the log was read, so nothing stored meanwhile is
/// missed. A dropped connection is opened again from the last event id (after 1, 2, 4 … 10 s).
pub async fn follow(
    server: &Server,
    filter: &Filter,
    first: reqwest::Response,
    mut seen: HashSet<i64>,
    mut each: impl FnMut(&EventRow, &Value),
) -> Result<()> {
    let mut resp = Some(first);
    let mut last_id: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut r = match resp.take() {
            Some(r) => r,
            None => match open_stream(server, filter, last_id.as_deref()).await {
                Ok(r) => {
                    eprintln!("event stream: connected again");
                    backoff = Duration::from_secs(1);
                    r
                }
                Err(e) => {
                    eprintln!("event stream: {e:#}; trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        let mut parser = SseParser::default();
        let why = loop {
            match r.chunk().await {
                Ok(Some(bytes)) => {
                    for m in parser.push(&bytes) {
                        if m.id.is_some() {
                            last_id.clone_from(&m.id);
                        }
                        if m.event.as_deref().is_some_and(|e| e != "event") {
                            continue;
                        }
                        let Ok(raw) = serde_json::from_str::<Value>(&m.data) else {
                            continue;
                        };
                        let Ok(e) = serde_json::from_value::<EventRow>(raw.clone()) else {
                            continue;
                        };
                        if seen.insert(e.seq) {
                            each(&e, &raw);
                        }
                        // Only seqs above the stream's start can come again; keep the set small.
                        if seen.len() > 100_000 {
                            seen.clear();
                        }
                    }
                }
                Ok(None) => break "the server closed the stream".to_string(),
                Err(e) => break format!("{e:#}"),
            }
        };
        eprintln!("event stream interrupted ({why}); reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_across_chunks() {
        let mut p = SseParser::default();
        assert!(p
            .push(b": keep-alive\n\nid: 7\nevent: event\nda")
            .is_empty());
        let m = p.push(b"ta: {\"seq\":7}\n\nid: 8\r\ndata: a\ndata: b\r\n\r\n");
        assert_eq!(
            m,
            vec![
                SseMessage {
                    id: Some("7".into()),
                    event: Some("event".into()),
                    data: "{\"seq\":7}".into()
                },
                SseMessage {
                    id: Some("8".into()),
                    event: None,
                    data: "a\nb".into()
                }
            ]
        );
        assert!(p.push(b"\n\n").is_empty());
    }

    #[test]
    fn since_takes_a_duration_or_passes_through() {
        assert_eq!(since_arg("1h", 7_200_000), "3600000");
        assert_eq!(since_arg("2026-01-01T00:00:00Z", 0), "2026-01-01T00:00:00Z");
        assert_eq!(since_arg("1700000000000", 0), "1700000000000");
        assert_eq!(since_arg("yesterday", 0), "yesterday");
    }

    #[test]
    fn filters_become_the_query() {
        let f = Filter {
            cluster: Some("main".into()),
            node: None,
            types: vec!["promoted".into(), "fenced".into()],
            since: Some("0".into()),
        };
        assert_eq!(
            f.query(true),
            vec![
                ("cluster", "main".to_string()),
                ("type", "promoted,fenced".into()),
                ("since", "0".into())
            ]
        );
        assert_eq!(f.query(false).len(), 2);
    }
}
