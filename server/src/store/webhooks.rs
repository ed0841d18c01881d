//! Webhooks in the store: the endpoints, the outbox of deliveries (written by `Outbox` in the
//! transaction that stores an event, so an event is stored with its deliveries or not at
//! all) and the log of attempts. A server claims a delivery with a conditional update before
//! an attempt, so with several servers on one store one attempt runs at a time; a claim left
//! by a crash expires and the delivery is taken again (at least once).

use super::{now_ms, Store};
use crate::webhooks::{EventDoc, Filter, Format, Severity};
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row};
use utoipa::ToSchema;

/// A webhook endpoint as stored, secret included (never shown by the API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    pub name: String,
    pub url: String,
    pub format: Format,
    /// Signs every delivery (HMAC-SHA256).
    pub secret: String,
    /// The PagerDuty integration key (format `pagerduty` only).
    pub routing_key: Option<String>,
    pub filter: Filter,
    pub enabled: bool,
    pub created_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A webhook as the API shows it: whether a secret is set, never the secret.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WebhookRow {
    pub id: String,
    pub name: String,
    pub url: String,
    pub format: Format,
    /// Always true: every webhook has a signing secret (shown only when the server made it).
    pub secret_set: bool,
    /// A PagerDuty routing key is set (it is not shown).
    pub routing_key_set: bool,
    /// Event types delivered; empty for every type.
    pub event_types: Vec<String>,
    /// Clusters whose events are delivered; empty for every cluster.
    pub clusters: Vec<String>,
    /// Events below this severity are not delivered.
    pub min_severity: Severity,
    pub enabled: bool,
    pub created_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Webhook {
    pub fn view(&self) -> WebhookRow {
        WebhookRow {
            id: self.id.clone(),
            name: self.name.clone(),
            url: self.url.clone(),
            format: self.format,
            secret_set: !self.secret.is_empty(),
            routing_key_set: self.routing_key.as_deref().is_some_and(|k| !k.is_empty()),
            event_types: self.filter.types.clone(),
            clusters: self.filter.clusters.clone(),
            min_severity: self.filter.min_severity,
            enabled: self.enabled,
            created_by: self.created_by.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
    }
}

/// One attempt to deliver.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AttemptRow {
    /// 1 for the first attempt.
    pub attempt: i64,
    /// The server that made it.
    pub server_id: String,
    pub started_ms: i64,
    pub latency_ms: i64,
    /// The receiver's HTTP status; absent when there was no answer.
    pub status_code: Option<i64>,
    /// Why there was no answer (timeout, connection refused, …) or why it counts as failed.
    pub error: Option<String>,
    /// The first 500 bytes of the answer's body.
    pub response: String,
}

/// One event on its way to one webhook.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeliveryRow {
    pub id: i64,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (given up at the maximum age).
    pub state: String,
    pub attempts: i64,
    pub created_ms: i64,
    /// When the next attempt is due (pending deliveries).
    pub next_attempt_ms: i64,
    /// The server holding a claim on it, while an attempt runs.
    pub claimed_by: Option<String>,
    pub last_error: Option<String>,
    /// When it was delivered or given up.
    pub done_ms: Option<i64>,
    /// The event as delivered.
    pub event: EventDoc,
    /// Every attempt, first first.
    pub attempt_log: Vec<AttemptRow>,
}

/// What an attempt found, to record.
#[derive(Clone, Debug)]
pub struct AttemptResult {
    pub attempt: i64,
    pub started_ms: i64,
    pub latency_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub response: String,
}

/// The state a delivery goes to after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    Delivered,
    Pending { next_attempt_ms: i64 },
    Failed,
}

const WEBHOOK_COLS: &str = "id, name, url, format, secret, routing_key, event_types, clusters, \
     min_severity, enabled, created_by, created_ms, updated_ms";

const DELIVERY_COLS: &str = "id, webhook_id, event_id, event_type, event_json, state, attempts, \
     created_ms, next_attempt_ms, claimed_by, last_error, done_ms";

fn list_of(r: &AnyRow, col: &str) -> Result<Vec<String>> {
    let text: String = r.try_get(col)?;
    serde_json::from_str(&text).with_context(|| format!("webhooks.{col} is not a JSON list"))
}

fn webhook_row(r: &AnyRow) -> Result<Webhook> {
    let format: String = r.try_get("format")?;
    let sev: String = r.try_get("min_severity")?;
    Ok(Webhook {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        url: r.try_get("url")?,
        format: Format::parse(&format).ok_or_else(|| anyhow!("unknown webhook format {format}"))?,
        secret: r.try_get("secret")?,
        routing_key: r.try_get("routing_key")?,
        filter: Filter {
            types: list_of(r, "event_types")?,
            clusters: list_of(r, "clusters")?,
            min_severity: Severity::parse(&sev).ok_or_else(|| anyhow!("unknown severity {sev}"))?,
        },
        enabled: r.try_get::<i64, _>("enabled")? != 0,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

fn delivery_row(r: &AnyRow) -> Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.try_get("id")?,
        webhook_id: r.try_get("webhook_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        created_ms: r.try_get("created_ms")?,
        next_attempt_ms: r.try_get("next_attempt_ms")?,
        claimed_by: r.try_get("claimed_by")?,
        last_error: r.try_get("last_error")?,
        done_ms: r.try_get("done_ms")?,
        event: serde_json::from_str(&r.try_get::<String, _>("event_json")?)
            .context("a delivery's event_json")?,
        attempt_log: Vec::new(),
    })
}

/// Queues deliveries of the events a transaction stores: the enabled webhooks' filters are
/// read (in the transaction) when its first new event arrives.
#[derive(Default)]
pub struct Outbox {
    hooks: Option<Vec<(String, Filter)>>,
    /// Deliveries queued so far.
    pub queued: usize,
}

impl Outbox {
    /// Queues `ev` (just stored, not a duplicate) for every enabled webhook whose filter
    /// matches it.
    pub async fn add(
        &mut self,
        tx: &mut sqlx::Transaction<'_, Any>,
        ev: &EventDoc,
        now: i64,
    ) -> Result<()> {
        if self.hooks.is_none() {
            let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE enabled = 1");
            let rows = sqlx::query(&sql).fetch_all(&mut **tx).await?;
            let mut hooks = Vec::new();
            for r in &rows {
                let w = webhook_row(r)?;
                hooks.push((w.id, w.filter));
            }
            self.hooks = Some(hooks);
        }
        let json = serde_json::to_string(ev)?;
        for (id, f) in self.hooks.iter().flatten() {
            if !f.matches(&ev.kind, &ev.cluster) {
                continue;
            }
            let r = sqlx::query(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, event_json, \
                 state, attempts, created_ms, next_attempt_ms) \
                 VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5) \
                 ON CONFLICT (webhook_id, event_id) DO NOTHING",
            )
            .bind(id.as_str())
            .bind(&ev.id)
            .bind(&ev.kind)
            .bind(&json)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            self.queued += r.rows_affected() as usize;
        }
        Ok(())
    }
}

impl Store {
    pub async fn create_webhook(&self, w: &Webhook) -> Result<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, name, url, format, secret, routing_key, event_types, \
             clusters, min_severity, enabled, created_by, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&w.id)
        .bind(&w.name)
        .bind(&w.url)
        .bind(w.format.as_str())
        .bind(&w.secret)
        .bind(w.routing_key.as_deref())
        .bind(serde_json::to_string(&w.filter.types)?)
        .bind(serde_json::to_string(&w.filter.clusters)?)
        .bind(w.filter.min_severity.as_str())
        .bind(i64::from(w.enabled))
        .bind(&w.created_by)
        .bind(w.created_ms)
        .bind(w.updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a webhook's settings (not its id, creator or creation time).
    pub async fn update_webhook(&self, w: &Webhook) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE webhooks SET name = $1, url = $2, format = $3, secret = $4, routing_key = $5, \
             event_types = $6, clusters = $7, min_severity = $8, enabled = $9, updated_ms = $10 \
             WHERE id = $11",
        )
        .bind(&w.name)
        .bind(&w.url)
        .bind(w.format.as_str())
        .bind(&w.secret)
        .bind(w.routing_key.as_deref())
        .bind(serde_json::to_string(&w.filter.types)?)
        .bind(serde_json::to_string(&w.filter.clusters)?)
        .bind(w.filter.min_severity.as_str())
        .bind(i64::from(w.enabled))
        .bind(w.updated_ms)
        .bind(&w.id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks ORDER BY created_ms, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(webhook_row).collect()
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(webhook_row)
            .transpose()
    }

    /// Deletes a webhook with its deliveries and their attempts.
    pub async fn delete_webhook(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT id FROM webhook_deliveries WHERE webhook_id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM webhooks WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Queues a delivery of `ev` to one webhook whatever its filter (the test send).
    pub async fn queue_delivery(&self, webhook_id: &str, ev: &EventDoc) -> Result<DeliveryRow> {
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, event_json, \
             state, attempts, created_ms, next_attempt_ms) \
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5) RETURNING id",
        )
        .bind(webhook_id)
        .bind(&ev.id)
        .bind(&ev.kind)
        .bind(serde_json::to_string(ev)?)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let id: i64 = row.try_get("id")?;
        self.delivery(id)
            .await?
            .ok_or_else(|| anyhow!("delivery {id} vanished"))
    }

    pub async fn delivery(&self, id: i64) -> Result<Option<DeliveryRow>> {
        let sql = format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut d = delivery_row(&row)?;
        d.attempt_log = self
            .attempts_of(&[id])
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        Ok(Some(d))
    }

    /// A webhook's deliveries, newest first, each with its attempts.
    pub async fn deliveries(
        &self,
        webhook_id: &str,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>> {
        let mut sql =
            format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE webhook_id = $1");
        if state.is_some() {
            sql.push_str(" AND state = $3");
        }
        sql.push_str(" ORDER BY id DESC LIMIT $2");
        let mut q = sqlx::query(&sql).bind(webhook_id).bind(limit.clamp(1, 500));
        if let Some(s) = state {
            q = q.bind(s);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out: Vec<DeliveryRow> = rows.iter().map(delivery_row).collect::<Result<_>>()?;
        let ids: Vec<i64> = out.iter().map(|d| d.id).collect();
        for (id, a) in self.attempts_of(&ids).await? {
            if let Some(d) = out.iter_mut().find(|d| d.id == id) {
                d.attempt_log.push(a);
            }
        }
        Ok(out)
    }

    async fn attempts_of(&self, ids: &[i64]) -> Result<Vec<(i64, AttemptRow)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT delivery_id, attempt, server_id, started_ms, latency_ms, status_code, error, \
             response FROM webhook_attempts WHERE delivery_id IN ({}) \
             ORDER BY delivery_id, attempt, id",
            list.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(*id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("delivery_id")?,
                    AttemptRow {
                        attempt: r.try_get("attempt")?,
                        server_id: r.try_get("server_id")?,
                        started_ms: r.try_get("started_ms")?,
                        latency_ms: r.try_get("latency_ms")?,
                        status_code: r.try_get("status_code")?,
                        error: r.try_get("error")?,
                        response: r.try_get("response")?,
                    },
                ))
            })
            .collect()
    }

    /// Deliveries due now that no server holds, oldest due first. Deliveries to a disabled
    /// webhook wait, except test sends.
    pub async fn due_deliveries(&self, now: i64, limit: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT d.id AS id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.state = 'pending' AND d.next_attempt_ms <= $1 \
             AND (d.claim_until_ms IS NULL OR d.claim_until_ms < $1) \
             AND (w.enabled = 1 OR d.event_type = $2) \
             ORDER BY d.next_attempt_ms, d.id LIMIT $3",
        )
        .bind(now)
        .bind(crate::webhooks::TEST_EVENT)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    /// Claims a due delivery for one attempt by `server` until `until`; on success returns it
    /// as it is now, with its webhook. Fails when another server holds an unexpired claim or
    /// the delivery is no longer due (another server just made its attempt).
    pub async fn claim_delivery(
        &self,
        id: i64,
        server: &str,
        until: i64,
        now: i64,
    ) -> Result<Option<(DeliveryRow, Webhook)>> {
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET claimed_by = $1, claim_until_ms = $2 \
             WHERE id = $3 AND state = 'pending' AND next_attempt_ms <= $4 \
             AND (claim_until_ms IS NULL OR claim_until_ms < $4)",
        )
        .bind(server)
        .bind(until)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        let sql = format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE id = $1");
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let d = delivery_row(&row)?;
        match self.webhook(&d.webhook_id).await? {
            Some(w) => Ok(Some((d, w))),
            None => Ok(None),
        }
    }

    /// Records an attempt and moves the delivery on, releasing `server`'s claim. When the
    /// claim was lost meanwhile (it expired and another server took the delivery), only the
    /// attempt is recorded; returns false then.
    pub async fn finish_attempt(
        &self,
        id: i64,
        server: &str,
        a: &AttemptResult,
        next: DeliveryState,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let (state, next_ms, done) = match next {
            DeliveryState::Delivered => ("delivered", now, Some(now)),
            DeliveryState::Pending { next_attempt_ms } => ("pending", next_attempt_ms, None),
            DeliveryState::Failed => ("failed", now, Some(now)),
        };
        let last_error = match (&a.error, a.status_code) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(s)) if !(200..300).contains(&s) => Some(format!("HTTP {s}")),
            _ => None,
        };
        let moved = sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, attempts = $2, next_attempt_ms = $3, \
             done_ms = $4, last_error = $5, claimed_by = NULL, claim_until_ms = NULL \
             WHERE id = $6 AND claimed_by = $7 AND state = 'pending'",
        )
        .bind(state)
        .bind(a.attempt)
        .bind(next_ms)
        .bind(done)
        .bind(last_error.as_deref())
        .bind(id)
        .bind(server)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, server_id, started_ms, \
             latency_ms, status_code, error, response) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1)",
        )
        .bind(id)
        .bind(a.attempt)
        .bind(server)
        .bind(a.started_ms)
        .bind(a.latency_ms)
        .bind(a.status_code)
        .bind(a.error.as_deref())
        .bind(&a.response)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// The old holder in a cluster's failover record of `epoch`, when the server has it.
    pub async fn old_holder(&self, cluster: &str, epoch: u64) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT record_json FROM failover_records WHERE cluster = $1 AND epoch = $2",
        )
        .bind(cluster)
        .bind(i64::try_from(epoch).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let v: serde_json::Value = serde_json::from_str(&row.try_get::<String, _>("record_json")?)?;
        Ok(v.get("old_holder")
            .and_then(|o| o.as_str())
            .map(String::from))
    }
}
