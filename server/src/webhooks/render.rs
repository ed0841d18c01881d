//! Webhook bodies, from the askama templates in `server/templates/`: the generic JSON event,
//! a Slack incoming-webhook message and a PagerDuty Events API v2 event. Every expression in
//! a `.json` template is escaped as the inside of a JSON string (`JsonString`, configured in
//! `server/askama.toml`), so any event text gives valid JSON.

use super::{pagerduty_action, EventDoc, Format, Severity};
use anyhow::{Context, Result};
use askama::Template;
use std::fmt::{self, Write};

/// askama escaper: the text as it goes between the quotes of a JSON string.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonString;

impl askama::filters::Escaper for JsonString {
    fn write_escaped_str<W: Write>(&self, mut dest: W, string: &str) -> fmt::Result {
        for c in string.chars() {
            match c {
                '"' => dest.write_str("\\\"")?,
                '\\' => dest.write_str("\\\\")?,
                '\n' => dest.write_str("\\n")?,
                '\r' => dest.write_str("\\r")?,
                '\t' => dest.write_str("\\t")?,
                c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                    write!(dest, "\\u{:04x}", c as u32)?
                }
                c => dest.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Template)]
#[template(path = "event.json")]
struct EventBody<'a> {
    e: &'a EventDoc,
}

#[derive(Template)]
#[template(path = "slack.json")]
struct SlackBody {
    fallback: String,
    header: String,
    what: String,
    cluster: String,
    node: String,
    severity: String,
    time: String,
    change: Option<String>,
    id: String,
    kind: String,
}

#[derive(Template)]
#[template(path = "pagerduty.json")]
struct PagerDutyBody {
    routing_key: String,
    action: &'static str,
    dedup_key: String,
    summary: String,
    severity: &'static str,
    source: String,
    timestamp: String,
    node: String,
    cluster: String,
    kind: String,
    id: String,
    message: String,
    change: Option<String>,
}

/// A change of primary as text: `n1 → n3`, or `? → n3` when the old one is unknown.
pub fn change_text(change: &(Option<String>, String)) -> String {
    format!("{} → {}", change.0.as_deref().unwrap_or("?"), change.1)
}

/// The body of a delivery of `e` in `format`. `routing_key` is the PagerDuty integration key;
/// `change` the old and new primary when the event tells of one (`super::primary_change`).
pub fn render(
    format: Format,
    e: &EventDoc,
    routing_key: Option<&str>,
    change: Option<&(Option<String>, String)>,
) -> Result<String> {
    match format {
        Format::Json => EventBody { e }.render(),
        Format::Slack => slack(e, change).render(),
        Format::Pagerduty => pagerduty(e, routing_key.unwrap_or_default(), change).render(),
    }
    .with_context(|| format!("render the {} body of event {}", format.as_str(), e.id))
}

fn rfc3339(ms: i64) -> String {
    pgwarden_core::timefmt::format_rfc3339(u64::try_from(ms).unwrap_or(0))
}

/// Slack's mrkdwn control characters (`&`, `<`, `>`) as entities.
pub fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn slack(e: &EventDoc, change: Option<&(Option<String>, String)>) -> SlackBody {
    let icon = match e.severity {
        Severity::Critical => ":rotating_light:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    };
    SlackBody {
        fallback: cut(
            &slack_escape(&format!(
                "[{}] {}/{}: {} — {}",
                e.severity.as_str(),
                e.cluster,
                e.node,
                e.kind,
                e.message
            )),
            2000,
        ),
        // Slack limits header text to 150 characters.
        header: cut(
            &format!("{icon} {}: {} on {}", e.cluster, e.kind, e.node),
            150,
        ),
        what: cut(&slack_escape(&e.message), 2900),
        cluster: slack_escape(&e.cluster),
        node: slack_escape(&e.node),
        severity: e.severity.as_str().to_string(),
        time: format!(
            "<!date^{}^{{date_short_pretty}} {{time_secs}}|{}>",
            e.ts_ms.div_euclid(1000),
            rfc3339(e.ts_ms)
        ),
        change: change.map(|c| slack_escape(&change_text(c))),
        id: slack_escape(&e.id),
        kind: slack_escape(&e.kind),
    }
}

fn pagerduty(
    e: &EventDoc,
    routing_key: &str,
    change: Option<&(Option<String>, String)>,
) -> PagerDutyBody {
    let (action, dedup_key) = pagerduty_action(&e.kind, &e.cluster, &e.node);
    PagerDutyBody {
        routing_key: routing_key.to_string(),
        action: action.as_str(),
        dedup_key,
        // PagerDuty limits the summary to 1024 characters.
        summary: cut(
            &format!("{}/{}: {}: {}", e.cluster, e.node, e.kind, e.message),
            1024,
        ),
        severity: e.severity.as_str(),
        source: format!("{}/{}", e.cluster, e.node),
        timestamp: rfc3339(e.ts_ms),
        node: e.node.clone(),
        cluster: e.cluster.clone(),
        kind: e.kind.clone(),
        id: e.id.clone(),
        message: e.message.clone(),
        change: change.map(change_text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ev(kind: &str, message: &str) -> EventDoc {
        EventDoc {
            seq: 42,
            id: "n1-1700000000000-7".into(),
            ts_ms: 1_700_000_000_123,
            received_ms: 1_700_000_000_500,
            cluster: "main".into(),
            node: "n1".into(),
            kind: kind.into(),
            message: message.into(),
            severity: super::super::severity_of(kind),
        }
    }

    /// Quotes, backslashes, newlines, control characters, non-ASCII text, JSON- and
    /// template-looking text.
    const NASTY: &str = "he said \"stop\"\\ now\nline 2\r\ttab \u{1} \u{2028} ünïcødé 日本 🐘 {{ x }} {% if %} </script> & <b>";

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    }

    #[test]
    fn the_json_body_is_the_event_with_its_severity() {
        let e = ev("promoted", NASTY);
        let v = parse(&render(Format::Json, &e, None, None).expect("render"));
        assert_eq!(v["id"], "n1-1700000000000-7");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["ts_ms"], 1_700_000_000_123_i64);
        assert_eq!(v["received_ms"], 1_700_000_000_500_i64);
        assert_eq!(v["cluster"], "main");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["type"], "promoted");
        assert_eq!(v["message"], NASTY, "the message survives exactly");
        assert_eq!(v["severity"], "warning");
        // The body is what serde would say about the same event.
        let direct: Value = serde_json::to_value(&e).expect("json");
        assert_eq!(v, direct);
    }

    #[test]
    fn the_slack_body_has_blocks() {
        let e = ev(
            "switchover",
            &format!("switched over from n1 to n2: {NASTY}"),
        );
        let change = (Some("n1".to_string()), "n2".to_string());
        let v = parse(&render(Format::Slack, &e, None, Some(&change)).expect("render"));
        let blocks = v["blocks"].as_array().expect("blocks");
        assert!(blocks.len() >= 4);
        for b in blocks {
            assert!(b.is_object() && b["type"].is_string(), "{b}");
        }
        assert_eq!(blocks[0]["type"], "header");
        let all = v.to_string();
        assert!(all.contains("*Primary*: n1 → n2"), "{all}");
        assert!(all.contains("*Cluster*\\nmain"), "{all}");
        assert!(
            all.contains("&lt;/script&gt; &amp; &lt;b&gt;"),
            "mrkdwn escaped: {all}"
        );
        assert!(v["text"]
            .as_str()
            .expect("text")
            .contains("ünïcødé 日本 🐘"));
        // Without a change there is no primary block, and it is still JSON.
        let v = parse(&render(Format::Slack, &ev("agent_down", NASTY), None, None).expect("r"));
        assert!(!v.to_string().contains("*Primary*"));
    }

    #[test]
    fn the_pagerduty_body_is_an_events_v2_event() {
        let e = ev("agent_down", NASTY);
        let v = parse(&render(Format::Pagerduty, &e, Some("R0UTING\"KEY"), None).expect("r"));
        assert_eq!(v["routing_key"], "R0UTING\"KEY");
        assert_eq!(v["event_action"], "trigger");
        assert_eq!(v["dedup_key"], "pgwarden/main/n1/agent_down");
        assert!(v["payload"]["summary"]
            .as_str()
            .expect("summary")
            .starts_with("main/n1: agent_down: he said \"stop\""));
        assert_eq!(v["payload"]["severity"], "critical");
        assert_eq!(v["payload"]["source"], "main/n1");
        assert_eq!(v["payload"]["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["payload"]["custom_details"]["message"], NASTY);
        let up =
            parse(&render(Format::Pagerduty, &ev("agent_up", "back"), Some("k"), None).expect("r"));
        assert_eq!(up["event_action"], "resolve");
        assert_eq!(up["dedup_key"], "pgwarden/main/n1/agent_down");
        assert_eq!(up["payload"]["severity"], "info");
        let change = (None, "n1".to_string());
        let p = parse(
            &render(
                Format::Pagerduty,
                &ev("promoted", "x"),
                Some("k"),
                Some(&change),
            )
            .expect("r"),
        );
        assert_eq!(p["payload"]["custom_details"]["primary_change"], "? → n1");
        assert_eq!(p["payload"]["severity"], "warning");
        // The summary stays within PagerDuty's limit.
        let long = ev("fenced", &"x".repeat(5000));
        let v = parse(&render(Format::Pagerduty, &long, Some("k"), None).expect("r"));
        assert_eq!(
            v["payload"]["summary"].as_str().map(|s| s.chars().count()),
            Some(1024)
        );
    }

    #[test]
    fn the_escaper_escapes_what_json_requires() {
        let mut out = String::new();
        askama::filters::Escaper::write_escaped_str(
            &JsonString,
            &mut out,
            "a\"b\\c\nd\u{0}e\u{1f}é",
        )
        .expect("write");
        assert_eq!(out, "a\\\"b\\\\c\\nd\\u0000e\\u001fé");
    }
}
