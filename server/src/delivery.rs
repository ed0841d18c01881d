//! Posting webhook deliveries (the I/O around `webhooks`): a loop finds due deliveries in the
//! outbox, claims each for one attempt (so with several servers on one store one attempt runs
//! at a time) and posts it in its own task, a few at a time, so a slow receiver holds up only
//! its own deliveries. Every attempt is recorded; a failure is retried with backoff until the
//! maximum age. A server that dies mid-attempt leaves a claim that expires after the attempt's
//! timeout plus a margin; the delivery is then taken again (at least once: receivers dedup on
//! `X-Pgwarden-Event-Id`).

use crate::app::{Counters, Shared};
use crate::store::{now_ms, AttemptResult, DeliveryRow, DeliveryState, Webhook};
use crate::webhooks::{self, render, EventDoc, Format, Next};
use anyhow::{Context, Result};
use pgwarden_core::server_config::ServerConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Attempts in flight at once on one server.
pub const CONCURRENCY: usize = 8;
/// How much longer than the attempt's timeout a claim lasts.
const CLAIM_MARGIN_MS: i64 = 5_000;
/// How much of an answer's body is kept.
const RESPONSE_KEEP: usize = 500;

pub const EVENT_ID_HEADER: &str = "X-Pgwarden-Event-Id";
pub const TIMESTAMP_HEADER: &str = "X-Pgwarden-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Pgwarden-Signature";

/// The client for webhook receivers: the system's root certificates, `[webhooks] timeout`
/// for the whole attempt, no redirects (a 3xx is a failed attempt).
pub fn client(cfg: &ServerConfig) -> Result<reqwest::Client> {
    let timeout = cfg.webhooks.timeout.0;
    reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("pgwarden-server/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("build the webhook HTTP client")
}

/// Runs forever: a pass whenever events are stored, a delivery finishes or is queued, and at
/// least every `retry_base` (between 50 ms and 1 s).
pub async fn run(app: Shared) {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let poll = app
        .cfg
        .webhooks
        .retry_base
        .0
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        // Created before the pass, so a wake-up during the pass is not lost.
        let events = app.events_changed.notified();
        let hooks = app.webhooks_changed.notified();
        if let Err(e) = pass(&app, &permits).await {
            tracing::warn!(error = %format!("{e:#}"), "webhook delivery pass failed");
        }
        tokio::select! {
            _ = events => {}
            _ = hooks => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Claims due deliveries while attempt slots are free and starts an attempt for each.
/// Returns how many started.
pub async fn pass(app: &Shared, permits: &Arc<Semaphore>) -> Result<usize> {
    let free = permits.available_permits();
    if free == 0 {
        return Ok(0);
    }
    let timeout_ms = i64::try_from(app.cfg.webhooks.timeout.0.as_millis()).unwrap_or(i64::MAX);
    let due = app.store.due_deliveries(now_ms(), free as i64 * 2).await?;
    let mut started = 0;
    for id in due {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            break;
        };
        let now = now_ms();
        let until = now
            .saturating_add(timeout_ms)
            .saturating_add(CLAIM_MARGIN_MS);
        let Some((d, w)) = app
            .store
            .claim_delivery(id, &app.server_id, until, now)
            .await?
        else {
            continue; // another server has it, or just made its attempt
        };
        let app2 = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = attempt(&app2, &d, &w).await {
                // The claim stays until it expires; the delivery is then taken again.
                tracing::warn!(delivery = d.id, webhook = %w.id, error = %format!("{e:#}"), "webhook attempt not recorded");
            }
            app2.webhooks_changed.notify_waiters();
        });
        started += 1;
    }
    Ok(started)
}

/// One attempt: render, sign, post, record, decide what comes next.
async fn attempt(app: &Shared, d: &DeliveryRow, w: &Webhook) -> Result<()> {
    let n = d.attempts.saturating_add(1);
    let change = match w.format {
        Format::Json => None,
        Format::Slack | Format::Pagerduty => primary_change(app, &d.event).await,
    };
    let started_ms = now_ms();
    let t0 = Instant::now();
    let (status_code, error, response) = match render::render(
        w.format,
        &d.event,
        w.routing_key.as_deref(),
        change.as_ref(),
    ) {
        Ok(body) => post(app, d, w, n, body).await,
        Err(e) => (None, Some(format!("{e:#}")), String::new()),
    };
    let latency_ms = i64::try_from(t0.elapsed().as_millis()).unwrap_or(i64::MAX);
    let success = error.is_none() && status_code.is_some_and(|s| (200..300).contains(&s));
    let now = now_ms();
    let cfg = &app.cfg.webhooks;
    let base_ms = u64::try_from(cfg.retry_base.0.as_millis()).unwrap_or(u64::MAX);
    let wait = webhooks::backoff_ms(
        u32::try_from(n).unwrap_or(u32::MAX),
        base_ms,
        webhooks::RETRY_CAP_MS,
        random_u64(),
    );
    let max_age_ms = i64::try_from(cfg.max_age.0.as_millis()).unwrap_or(i64::MAX);
    let next = match webhooks::after_attempt(
        success,
        u32::try_from(n).unwrap_or(u32::MAX),
        d.created_ms,
        now,
        max_age_ms,
        wait,
    ) {
        Next::Delivered => DeliveryState::Delivered,
        Next::Retry(at) => DeliveryState::Pending {
            next_attempt_ms: at,
        },
        Next::Failed => DeliveryState::Failed,
    };
    Counters::inc(&app.counters.webhook_attempts);
    if !success {
        Counters::inc(&app.counters.webhook_attempt_failures);
    }
    if next == DeliveryState::Failed {
        Counters::inc(&app.counters.webhook_deliveries_failed);
    }
    let result = AttemptResult {
        attempt: n,
        started_ms,
        latency_ms,
        status_code,
        error: error.clone(),
        response,
    };
    let kept = app
        .store
        .finish_attempt(d.id, &app.server_id, &result, next, now)
        .await?;
    match (next, kept) {
        (_, false) => tracing::warn!(
            delivery = d.id,
            "the claim on the delivery was lost during the attempt"
        ),
        (DeliveryState::Delivered, _) => {
            tracing::debug!(delivery = d.id, webhook = %w.id, event = %d.event.id, attempt = n, latency_ms, "webhook delivered")
        }
        (DeliveryState::Pending { next_attempt_ms }, _) => {
            tracing::info!(delivery = d.id, webhook = %w.id, event = %d.event.id, attempt = n, status = ?status_code, error = ?error, retry_in_ms = next_attempt_ms - now, "webhook attempt failed")
        }
        (DeliveryState::Failed, _) => {
            tracing::warn!(delivery = d.id, webhook = %w.id, event = %d.event.id, attempts = n, status = ?status_code, error = ?error, "webhook delivery given up (maximum age)")
        }
    }
    Ok(())
}

/// Posts a rendered body: status, error, the start of the answer.
async fn post(
    app: &Shared,
    d: &DeliveryRow,
    w: &Webhook,
    attempt: i64,
    body: String,
) -> (Option<i64>, Option<String>, String) {
    let ts = now_ms().div_euclid(1000);
    let sig = webhooks::signature(&w.secret, ts, body.as_bytes());
    let sent = app
        .webhooks
        .post(&w.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_ID_HEADER, &d.event.id)
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sig)
        .header("X-Pgwarden-Delivery", d.id.to_string())
        .header("X-Pgwarden-Attempt", attempt.to_string())
        .body(body)
        .send()
        .await;
    let mut r = match sent {
        Ok(r) => r,
        Err(e) => return (None, Some(describe(e)), String::new()),
    };
    let status = i64::from(r.status().as_u16());
    let mut kept: Vec<u8> = Vec::new();
    let mut error = None;
    while kept.len() < RESPONSE_KEEP {
        match r.chunk().await {
            Ok(Some(c)) => kept.extend_from_slice(&c),
            Ok(None) => break,
            Err(e) => {
                // The status arrived; a body cut short does not change it.
                if !(200..300).contains(&status) {
                    error = Some(describe(e));
                }
                break;
            }
        }
    }
    (Some(status), error, utf8_prefix(&kept, RESPONSE_KEEP))
}

/// At most `max` bytes of `bytes` as text, cut at a character boundary.
pub fn utf8_prefix(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A client error without the URL (a Slack URL is a credential), with its causes.
fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

/// The old and new primary an event tells of, looking up the failover record of its epoch.
async fn primary_change(app: &Shared, e: &EventDoc) -> Option<(Option<String>, String)> {
    let old = match webhooks::epoch_in(&e.message) {
        Some(epoch) if matches!(e.kind.as_str(), "promoted" | "failover" | "lease_acquired") => {
            app.store.old_holder(&e.cluster, epoch).await.ok().flatten()
        }
        _ => None,
    };
    webhooks::primary_change(&e.kind, &e.node, &e.message, old.as_deref())
}

/// 64 random bits for the jitter (the clock's nanoseconds if the kernel's source fails).
fn random_u64() -> u64 {
    crate::auth::random_hex(8)
        .ok()
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::from(d.subsec_nanos()))
                .unwrap_or(0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_to_500_bytes_of_text() {
        assert_eq!(utf8_prefix(b"ok", 500), "ok");
        let long = "é".repeat(400); // 800 bytes
        let kept = utf8_prefix(long.as_bytes(), RESPONSE_KEEP);
        assert!(kept.len() <= 500 && kept.len() >= 498, "{}", kept.len());
        assert!(kept.chars().all(|c| c == 'é'));
    }
}
