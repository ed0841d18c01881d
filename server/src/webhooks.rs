//! Webhooks: which events go to which endpoint, how severe an event is, when a failed
//! delivery is tried again, how a delivery is signed, and what PagerDuty is told. Only
//! decisions live here (no I/O, time is an argument); the outbox is written by the store
//! (`store::webhooks`) in the transaction that stores the event, the bodies are rendered by
//! `render`, and `delivery` posts them. `docs/webhooks.md` describes the behaviour.

pub mod render;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;

/// How serious an event is, lowest first (the order filters compare with).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// The severity of an event type. Critical: the cluster may be unable to write, may have two
/// writers, or a node is out of the server's sight. Warning: a failover happened or the
/// cluster runs degraded. Everything else, unknown types included, is info.
pub fn severity_of(kind: &str) -> Severity {
    match kind {
        "fencing_failed" | "lease_lost" | "agent_down" | "stepped_down" | "postgres_crashed"
        | "refused" | "rewind_failed" => Severity::Critical,
        "fenced"
        | "fencing"
        | "promoted"
        | "failover"
        | "switchover_failed"
        | "synchronous_degraded"
        | "peer_unreachable"
        | "action_failed"
        | "address_error"
        | "data_dir_moved_aside" => Severity::Warning,
        _ => Severity::Info,
    }
}

/// The alert an event clears, if it is the clearing counterpart of one: `agent_up` clears
/// `agent_down` of the same node, and so on.
pub fn clears(kind: &str) -> Option<&'static str> {
    match kind {
        "agent_up" => Some("agent_down"),
        "postgres_started" => Some("postgres_crashed"),
        "peer_reachable" => Some("peer_unreachable"),
        "sync_set_committed" => Some("synchronous_degraded"),
        _ => None,
    }
}

/// The severity a filter compares: a clearing event counts as much as the alert it clears, so
/// whoever hears of `agent_down` also hears of the `agent_up` that ends it.
pub fn filter_severity(kind: &str) -> Severity {
    let own = severity_of(kind);
    clears(kind).map_or(own, |a| own.max(severity_of(a)))
}

/// Body formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The event as in the API, plus its severity.
    Json,
    /// A Slack incoming webhook message (`blocks`).
    Slack,
    /// A PagerDuty Events API v2 event.
    Pagerduty,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Json, Format::Slack, Format::Pagerduty];

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Slack => "slack",
            Format::Pagerduty => "pagerduty",
        }
    }
}

/// Which events a webhook wants. Empty lists mean every type and every cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub types: Vec<String>,
    pub clusters: Vec<String>,
    pub min_severity: Severity,
}

impl Filter {
    /// Whether an event of type `kind` in `cluster` goes to this webhook. A type list that
    /// names an alert also admits the events that clear it.
    pub fn matches(&self, kind: &str, cluster: &str) -> bool {
        let type_ok = self.types.is_empty()
            || self
                .types
                .iter()
                .any(|t| t == kind || clears(kind) == Some(t.as_str()));
        let cluster_ok = self.clusters.is_empty() || self.clusters.iter().any(|c| c == cluster);
        type_ok && cluster_ok && filter_severity(kind) >= self.min_severity
    }
}

/// An event as a webhook receives it: the event as the API shows it, with its severity.
/// Kept in the outbox with each delivery, so a delivery does not depend on the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventDoc {
    /// Position in the store's event log (0 for a test event).
    pub seq: i64,
    /// The event's stable id: the same in every delivery of it (dedup on it).
    pub id: String,
    pub ts_ms: i64,
    pub received_ms: i64,
    pub cluster: String,
    pub node: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub severity: Severity,
}

/// The type of the synthetic event `POST /webhooks/{id}/test` sends.
pub const TEST_EVENT: &str = "webhook_test";

/// The longest wait between two attempts.
pub const RETRY_CAP_MS: u64 = 5 * 60 * 1000;

/// The upper bound of the wait after the `attempt`-th failed attempt (1-based): `base`,
/// `2 × base`, `4 × base`, … at most `cap`.
pub fn retry_ceiling_ms(attempt: u32, base_ms: u64, cap_ms: u64) -> u64 {
    let doublings = attempt.saturating_sub(1).min(62);
    base_ms.saturating_mul(1u64 << doublings).min(cap_ms)
}

/// The wait after the `attempt`-th failed attempt, with full jitter: uniform in
/// `[0, ceiling]`, drawn from `random` (any 64 random bits), so servers that failed together
/// do not retry together.
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, random: u64) -> u64 {
    let ceiling = retry_ceiling_ms(attempt, base_ms, cap_ms);
    random % (ceiling.saturating_add(1))
}

/// What becomes of a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Try again at this time (ms since the epoch).
    Retry(i64),
    /// Given up: the event is older than the maximum age.
    Failed,
}

/// The decision after an attempt that ended at `now_ms`. A failure is retried after the
/// backoff, but not later than the maximum age (one last attempt there); a failure at or past
/// the maximum age is final.
pub fn after_attempt(
    success: bool,
    attempt: u32,
    created_ms: i64,
    now_ms: i64,
    max_age_ms: i64,
    backoff_ms: u64,
) -> Next {
    if success {
        return Next::Delivered;
    }
    let give_up_at = created_ms.saturating_add(max_age_ms);
    if now_ms >= give_up_at || attempt == u32::MAX {
        return Next::Failed;
    }
    let wait = i64::try_from(backoff_ms).unwrap_or(i64::MAX);
    Next::Retry(now_ms.saturating_add(wait).min(give_up_at))
}

/// The signature header's value: `v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>` keyed
/// with the webhook's secret.
pub fn signature(secret: &str, timestamp_s: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex(&hmac_sha256(
            secret.as_bytes(),
            &signed_payload(timestamp_s, body)
        ))
    )
}

/// What is signed: the timestamp, a dot, the body.
pub fn signed_payload(timestamp_s: i64, body: &[u8]) -> Vec<u8> {
    let mut v = format!("{timestamp_s}.").into_bytes();
    v.extend_from_slice(body);
    v
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PagerDuty's `event_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdAction {
    Trigger,
    Resolve,
}

impl PdAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PdAction::Trigger => "trigger",
            PdAction::Resolve => "resolve",
        }
    }
}

/// What a PagerDuty event says about an alert: a clearing event resolves the alert it clears
/// on the same node; any other event triggers (or updates) the alert named by its type.
/// `dedup_key` = `pgwarden/<cluster>/<node>/<alert>`.
pub fn pagerduty_action(kind: &str, cluster: &str, node: &str) -> (PdAction, String) {
    let (action, alert) = match clears(kind) {
        Some(a) => (PdAction::Resolve, a),
        None => (PdAction::Trigger, kind),
    };
    (action, format!("pgwarden/{cluster}/{node}/{alert}"))
}

/// The lease epoch an event's message names (`… (lease epoch 7)`, `took the lease, epoch 7`).
pub fn epoch_in(message: &str) -> Option<u64> {
    let at = message.find("epoch ")? + "epoch ".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A change of primary an event tells of, best effort: the old primary (when known) and the
/// new one. `switchover` messages say `from A to B`; after `promoted`, `failover` and
/// `lease_acquired` the node itself is the new primary and the old one comes from the
/// failover record of the epoch (`old_holder`), when the server has it.
pub fn primary_change(
    kind: &str,
    node: &str,
    message: &str,
    old_holder: Option<&str>,
) -> Option<(Option<String>, String)> {
    if let Some((from, to)) = from_to(message) {
        if matches!(
            kind,
            "switchover" | "switchover_done" | "failover" | "promoted"
        ) {
            return Some((Some(from), to));
        }
    }
    match kind {
        "promoted" | "failover" | "lease_acquired" => Some((
            old_holder.filter(|o| *o != node).map(String::from),
            node.to_string(),
        )),
        _ => None,
    }
}

/// `… from A to B …` → (A, B), names being the characters allowed in node names.
fn from_to(message: &str) -> Option<(String, String)> {
    let name = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
            .collect::<String>()
            .trim_end_matches('.')
            .to_string()
    };
    let at = message.find("from ")?;
    let rest = &message[at + 5..];
    let from = name(rest);
    let after = rest[from.len()..].strip_prefix(" to ")?;
    let to = name(after);
    (!from.is_empty() && !to.is_empty()).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_follow_the_documented_table() {
        for k in ["fencing_failed", "lease_lost", "agent_down", "stepped_down"] {
            assert_eq!(severity_of(k), Severity::Critical, "{k}");
        }
        for k in ["fenced", "promoted", "failover", "synchronous_degraded"] {
            assert_eq!(severity_of(k), Severity::Warning, "{k}");
        }
        for k in [
            "switchover",
            "agent_up",
            "lease_acquired",
            "webhook_test",
            "never_heard_of",
        ] {
            assert_eq!(severity_of(k), Severity::Info, "{k}");
        }
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Critical);
        assert_eq!(Severity::parse("warning"), Some(Severity::Warning));
        assert_eq!(Severity::parse("Warning"), None);
        // A clearing event weighs what it clears.
        assert_eq!(filter_severity("agent_up"), Severity::Critical);
        assert_eq!(filter_severity("switchover"), Severity::Info);
    }

    #[test]
    fn filters_match_type_cluster_and_severity() {
        let all = Filter {
            types: vec![],
            clusters: vec![],
            min_severity: Severity::Info,
        };
        assert!(all.matches("anything", "any"));
        let f = Filter {
            types: vec!["agent_down".into(), "promoted".into()],
            clusters: vec!["main".into()],
            min_severity: Severity::Warning,
        };
        assert!(f.matches("agent_down", "main"));
        assert!(f.matches("promoted", "main"));
        assert!(
            f.matches("agent_up", "main"),
            "the clearing event of a listed alert"
        );
        assert!(!f.matches("agent_down", "other"), "another cluster");
        assert!(!f.matches("fenced", "main"), "a type not listed");
        let sev = Filter {
            types: vec![],
            clusters: vec![],
            min_severity: Severity::Critical,
        };
        assert!(sev.matches("lease_lost", "x"));
        assert!(!sev.matches("promoted", "x"), "warning below critical");
        assert!(!sev.matches("switchover", "x"));
        assert!(sev.matches("agent_up", "x"), "clears a critical alert");
        assert!(!sev.matches("peer_reachable", "x"), "clears a warning only");
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap_with_full_jitter() {
        let (base, cap) = (1000, RETRY_CAP_MS);
        assert_eq!(retry_ceiling_ms(1, base, cap), 1000);
        assert_eq!(retry_ceiling_ms(2, base, cap), 2000);
        assert_eq!(retry_ceiling_ms(3, base, cap), 4000);
        assert_eq!(retry_ceiling_ms(9, base, cap), 256_000);
        assert_eq!(retry_ceiling_ms(10, base, cap), cap);
        assert_eq!(retry_ceiling_ms(u32::MAX, base, cap), cap);
        assert_eq!(retry_ceiling_ms(0, base, cap), 1000);
        for attempt in [1, 2, 5, 30, 1000] {
            let ceiling = retry_ceiling_ms(attempt, base, cap);
            for r in [0, 1, 999, 1000, 12345, u64::MAX / 3, u64::MAX] {
                let d = backoff_ms(attempt, base, cap, r);
                assert!(d <= ceiling, "attempt {attempt}: {d} > {ceiling}");
            }
            assert_eq!(backoff_ms(attempt, base, cap, 0), 0);
            assert_eq!(backoff_ms(attempt, base, cap, ceiling), ceiling);
        }
        // Spread: a range of random inputs covers the whole window.
        let ds: Vec<u64> = (0..4001).map(|r| backoff_ms(3, base, cap, r)).collect();
        assert_eq!(ds.iter().min(), Some(&0));
        assert_eq!(ds.iter().max(), Some(&4000));
    }

    #[test]
    fn a_failed_attempt_is_retried_until_the_maximum_age() {
        let day = 86_400_000;
        assert_eq!(after_attempt(true, 1, 0, 10, day, 500), Next::Delivered);
        assert_eq!(after_attempt(false, 1, 0, 10, day, 500), Next::Retry(510));
        // Not past the maximum age: the last try is at it.
        assert_eq!(
            after_attempt(false, 9, 0, day - 100, day, 300_000),
            Next::Retry(day)
        );
        assert_eq!(after_attempt(false, 10, 0, day, day, 1), Next::Failed);
        assert_eq!(after_attempt(false, 10, 0, day + 5, day, 1), Next::Failed);
    }

    #[test]
    fn signatures_match_a_known_vector() {
        // RFC 4231 test case 2 for the MAC itself.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Python: hmac.new(b"whsec_test", b'1700000000.{"id":"e1"}', hashlib.sha256).hexdigest()
        assert_eq!(
            signature("whsec_test", 1_700_000_000, br#"{"id":"e1"}"#),
            "v1=6a85cb117c993612a34c72b4cfb5a16baed25a80d26e298ce0e6671320fd07c8"
        );
        assert_ne!(
            signature("whsec_test", 1_700_000_001, br#"{"id":"e1"}"#),
            signature("whsec_test", 1_700_000_000, br#"{"id":"e1"}"#),
            "the timestamp is signed"
        );
    }

    #[test]
    fn pagerduty_triggers_alerts_and_resolves_them_with_their_counterpart() {
        let (a, k) = pagerduty_action("agent_down", "main", "n1");
        assert_eq!(
            (a, k.as_str()),
            (PdAction::Trigger, "pgwarden/main/n1/agent_down")
        );
        let (a, k2) = pagerduty_action("agent_up", "main", "n1");
        assert_eq!(a, PdAction::Resolve);
        assert_eq!(k2, k, "the same alert");
        let (a, k) = pagerduty_action("fencing_failed", "main", "n2");
        assert_eq!(
            (a, k.as_str()),
            (PdAction::Trigger, "pgwarden/main/n2/fencing_failed")
        );
        let (a, k) = pagerduty_action("postgres_started", "main", "n2");
        assert_eq!(
            (a, k.as_str()),
            (PdAction::Resolve, "pgwarden/main/n2/postgres_crashed")
        );
        assert_eq!(pagerduty_action("promoted", "c", "n").0.as_str(), "trigger");
    }

    #[test]
    fn primary_changes_are_read_from_messages_and_records() {
        assert_eq!(
            primary_change(
                "switchover",
                "n1",
                "switched over from n1 to n2: 840 ms from the shutdown to the new primary",
                None
            ),
            Some((Some("n1".into()), "n2".into()))
        );
        assert_eq!(
            primary_change(
                "promoted",
                "n3",
                "promoted to primary (lease epoch 7)",
                Some("n1")
            ),
            Some((Some("n1".into()), "n3".into()))
        );
        assert_eq!(
            primary_change(
                "promoted",
                "n3",
                "promoted to primary (lease epoch 7)",
                None
            ),
            Some((None, "n3".into()))
        );
        assert_eq!(
            primary_change("agent_down", "n3", "from a to b", None),
            None
        );
        assert_eq!(epoch_in("promoted to primary (lease epoch 7)"), Some(7));
        assert_eq!(epoch_in("took the lease, epoch 12: expired"), Some(12));
        assert_eq!(epoch_in("no epoch here"), None);
    }
}
