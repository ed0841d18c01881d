//! `/api/v1/webhooks`: webhook endpoints (admins change them, viewers read them without their
//! secrets), a test send, and each endpoint's delivery log with its attempts.

use super::ProblemDoc;
use crate::app::{
    bad_query, internal, not_found, unprocessable, Admin, ApiJson, Authed, QueryMap, Shared, Viewer,
};
use crate::auth::{self, Role};
use crate::store::{now_ms, DeliveryRow, Webhook, WebhookRow};
use crate::webhooks::{EventDoc, Filter, Format, Severity, TEST_EVENT};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// A label for people.
    #[schema(max_length = 100)]
    pub name: Option<String>,
    /// Where deliveries are posted: `https://…` (or `http://…`).
    #[schema(max_length = 2000)]
    pub url: String,
    pub format: Format,
    /// The signing secret (16 to 256 characters). When absent the server makes one and
    /// returns it once.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: Option<String>,
    /// The PagerDuty integration key: required for format `pagerduty`, refused otherwise.
    #[schema(min_length = 1, max_length = 128)]
    pub routing_key: Option<String>,
    /// Event types to deliver (lowercase letters, digits, `_`; all when absent or empty). An
    /// alert's type also admits the events that clear it (`agent_down` admits `agent_up`).
    pub event_types: Option<Vec<String>>,
    /// Clusters whose events to deliver (cluster names; all when absent or empty).
    pub clusters: Option<Vec<String>>,
    /// Events below this severity are not delivered (`info`: all).
    pub min_severity: Option<Severity>,
    /// True when absent.
    pub enabled: Option<bool>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhook {
    #[schema(max_length = 100)]
    pub name: Option<String>,
    #[schema(max_length = 2000)]
    pub url: Option<String>,
    pub format: Option<Format>,
    /// A new signing secret (16 to 256 characters).
    #[schema(min_length = 16, max_length = 256)]
    pub secret: Option<String>,
    /// A new PagerDuty integration key; `""` removes it. Leaving format `pagerduty` removes
    /// it too.
    #[schema(max_length = 128)]
    pub routing_key: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub clusters: Option<Vec<String>>,
    pub min_severity: Option<Severity>,
    pub enabled: Option<bool>,
}

/// A new webhook, with the secret when the server made it (shown this once).
#[derive(Serialize, ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: WebhookRow,
    /// The signing secret the server made; absent when the request gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Checks a webhook's settings: the field at fault and why.
pub fn check(w: &Webhook) -> Result<(), (&'static str, String)> {
    if w.name.chars().count() > 100 || w.name.chars().any(char::is_control) {
        return Err((
            "name",
            "at most 100 characters, no control characters".into(),
        ));
    }
    check_url(&w.url).map_err(|e| ("url", e))?;
    let n = w.secret.chars().count();
    if !(16..=256).contains(&n) || w.secret.chars().any(char::is_control) {
        return Err((
            "secret",
            "16 to 256 characters, no control characters".into(),
        ));
    }
    match (w.format, w.routing_key.as_deref()) {
        (Format::Pagerduty, None | Some("")) => {
            return Err((
                "routing_key",
                "format pagerduty needs the routing_key of a PagerDuty Events API v2 integration"
                    .into(),
            ))
        }
        (Format::Pagerduty, Some(k))
            if k.chars().count() > 128
                || k.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            return Err((
                "routing_key",
                "at most 128 characters, no spaces or control characters".into(),
            ))
        }
        (f, Some(k)) if f != Format::Pagerduty && !k.is_empty() => {
            return Err((
                "routing_key",
                format!(
                    "only format pagerduty takes a routing_key, not {}",
                    w.format.as_str()
                ),
            ))
        }
        _ => {}
    }
    if let Some(t) = w.filter.types.iter().find(|t| !valid_type(t)) {
        return Err((
            "event_types",
            format!("{t:?} is not an event type (lowercase letters, digits and _)"),
        ));
    }
    if let Some(c) = w.filter.clusters.iter().find(|c| !auth::valid_name(c)) {
        return Err(("clusters", format!("{c:?} is not a valid cluster name")));
    }
    Ok(())
}

fn valid_type(t: &str) -> bool {
    let mut chars = t.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && t.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// An absolute `http` or `https` URL with a host.
pub fn check_url(u: &str) -> Result<(), String> {
    if u.len() > 2000 {
        return Err("at most 2000 characters".into());
    }
    if u.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("no spaces or control characters (percent-encode them)".into());
    }
    let parsed = reqwest::Url::parse(u).map_err(|e| format!("{u:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{u:?}: the scheme must be https (or http), not {}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{u:?} has no host"));
    }
    Ok(())
}

/// A URL without its path and query, for callers who may not see credentials in it (a
/// Slack webhook URL is one).
pub fn redact_url(u: &str) -> String {
    match reqwest::Url::parse(u) {
        Ok(p) => {
            let port = p.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}/…",
                p.scheme(),
                p.host_str().unwrap_or_default()
            )
        }
        Err(_) => "…".into(),
    }
}

/// As a caller with `role` may see it: the full URL for admins only.
fn view_for(w: &Webhook, role: Role) -> WebhookRow {
    let mut v = w.view();
    if role < Role::Admin {
        v.url = redact_url(&v.url);
    }
    v
}

fn bad(e: (&str, String)) -> Response {
    unprocessable(e.0, e.1)
}

async fn load(app: &Shared, id: &str) -> Result<Webhook, Response> {
    match app.store.webhook(id).await {
        Ok(Some(w)) => Ok(w),
        Ok(None) => Err(not_found(format!("no webhook {id:?}"))),
        Err(e) => Err(internal(e)),
    }
}

/// Every webhook. Only admins see the whole URL; nobody sees the secret.
#[utoipa::path(get, path = "/api/v1/webhooks", security(("bearer" = [])),
    responses((status = 200, body = [WebhookRow]), (status = 401, body = ProblemDoc)))]
pub(super) async fn list_webhooks(Authed(a): Viewer, State(app): State<Shared>) -> Response {
    match app.store.webhooks().await {
        Ok(ws) => Json(ws.iter().map(|w| view_for(w, a.role)).collect::<Vec<_>>()).into_response(),
        Err(e) => internal(e),
    }
}

/// Creates a webhook. Without `secret` the server makes one and returns it once.
#[utoipa::path(post, path = "/api/v1/webhooks", security(("bearer" = [])), request_body = CreateWebhook,
    responses((status = 201, body = WebhookCreated), (status = 401, body = ProblemDoc),
        (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
pub(super) async fn create_webhook(
    Authed(a): Admin,
    State(app): State<Shared>,
    ApiJson(c): ApiJson<CreateWebhook>,
) -> Response {
    let (secret, made) = match c.secret {
        Some(s) => (s, None),
        None => match auth::random_hex(24) {
            Ok(h) => {
                let s = format!("whsec_{h}");
                (s.clone(), Some(s))
            }
            Err(e) => return internal(e),
        },
    };
    let id = match auth::random_hex(8) {
        Ok(h) => format!("wh-{h}"),
        Err(e) => return internal(e),
    };
    let now = now_ms();
    let w = Webhook {
        id,
        name: c.name.unwrap_or_default(),
        url: c.url,
        format: c.format,
        secret,
        routing_key: c.routing_key.filter(|k| !k.is_empty()),
        filter: Filter {
            types: c.event_types.unwrap_or_default(),
            clusters: c.clusters.unwrap_or_default(),
            min_severity: c.min_severity.unwrap_or(Severity::Info),
        },
        enabled: c.enabled.unwrap_or(true),
        created_by: a.user,
        created_ms: now,
        updated_ms: now,
    };
    if let Err(e) = check(&w) {
        return bad(e);
    }
    if let Err(e) = app.store.create_webhook(&w).await {
        return internal(e);
    }
    (
        StatusCode::CREATED,
        Json(WebhookCreated {
            webhook: w.view(),
            secret: made,
        }),
    )
        .into_response()
}

/// One webhook.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = WebhookRow), (status = 401, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
pub(super) async fn get_webhook(
    Authed(a): Viewer,
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    match load(&app, &id).await {
        Ok(w) => Json(view_for(&w, a.role)).into_response(),
        Err(r) => r,
    }
}

/// Changes a webhook's settings; absent fields keep their value. Pending deliveries go out
/// with the new URL, format and secret.
#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = UpdateWebhook,
    responses((status = 200, body = WebhookRow), (status = 401, body = ProblemDoc), (status = 403, body = ProblemDoc),
        (status = 404, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
pub(super) async fn update_webhook(
    _a: Admin,
    State(app): State<Shared>,
    Path(id): Path<String>,
    ApiJson(u): ApiJson<UpdateWebhook>,
) -> Response {
    let mut w = match load(&app, &id).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Some(v) = u.name {
        w.name = v;
    }
    if let Some(v) = u.url {
        w.url = v;
    }
    if let Some(v) = u.format {
        w.format = v;
    }
    if let Some(v) = u.secret {
        w.secret = v;
    }
    match u.routing_key {
        Some(k) if k.is_empty() => w.routing_key = None,
        Some(k) => w.routing_key = Some(k),
        // The key belongs to the PagerDuty integration: it goes when the format does.
        None if w.format != Format::Pagerduty => w.routing_key = None,
        None => {}
    }
    if let Some(v) = u.event_types {
        w.filter.types = v;
    }
    if let Some(v) = u.clusters {
        w.filter.clusters = v;
    }
    if let Some(v) = u.min_severity {
        w.filter.min_severity = v;
    }
    if let Some(v) = u.enabled {
        w.enabled = v;
    }
    w.updated_ms = now_ms();
    if let Err(e) = check(&w) {
        return bad(e);
    }
    match app.store.update_webhook(&w).await {
        Ok(true) => Json(w.view()).into_response(),
        Ok(false) => not_found(format!("no webhook {id:?}")),
        Err(e) => internal(e),
    }
}

/// Deletes a webhook with its delivery log; pending deliveries are dropped.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ProblemDoc), (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
pub(super) async fn delete_webhook(
    _a: Admin,
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    match app.store.delete_webhook(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(format!("no webhook {id:?}")),
        Err(e) => internal(e),
    }
}

/// Sends a synthetic `webhook_test` event to this webhook only (whatever its filter, enabled
/// or not), signed and retried like any delivery. Follow it in the delivery log.
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/test", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202, description = "queued", body = DeliveryRow), (status = 401, body = ProblemDoc),
        (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
pub(super) async fn test_webhook(
    Authed(a): Admin,
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let w = match load(&app, &id).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let suffix = match auth::random_hex(8) {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let now = now_ms();
    let ev = EventDoc {
        seq: 0,
        id: format!("webhook-test-{suffix}"),
        ts_ms: now,
        received_ms: now,
        cluster: w
            .filter
            .clusters
            .first()
            .cloned()
            .unwrap_or_else(|| "pgwarden".into()),
        node: app.server_id.clone(),
        kind: TEST_EVENT.into(),
        message: format!("test delivery to webhook {} requested by {}", w.id, a.user),
        severity: Severity::Info,
    };
    match app.store.queue_delivery(&w.id, &ev).await {
        Ok(d) => {
            app.webhooks_changed.notify_waiters();
            (StatusCode::ACCEPTED, Json(d)).into_response()
        }
        Err(e) => internal(e),
    }
}

/// The webhook's deliveries, newest first, each with every attempt (status or error,
/// latency, the start of the answer). `state`: `pending`, `delivered` or `failed`.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", security(("bearer" = [])),
    params(("id" = String, Path),
        ("state" = Option<String>, Query, pattern = "^(pending|delivered|failed)$"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, body = [DeliveryRow]), (status = 400, body = ProblemDoc), (status = 401, body = ProblemDoc),
        (status = 404, body = ProblemDoc)))]
pub(super) async fn webhook_deliveries(
    _v: Viewer,
    State(app): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let q = QueryMap::from_uri(req.uri().query());
    if let Err(r) = q.only(&["state", "limit"]) {
        return r;
    }
    let state = q.str("state");
    if let Some(s) = &state {
        if !matches!(s.as_str(), "pending" | "delivered" | "failed") {
            return bad_query(
                "state",
                format!("{s:?} is not a delivery state (pending, delivered, failed)"),
            );
        }
    }
    let limit = match q.int("limit", 1, 500) {
        Ok(l) => l.unwrap_or(50),
        Err(r) => return r,
    };
    if let Err(r) = load(&app, &id).await {
        return r;
    }
    match app.store.deliveries(&id, state.as_deref(), limit).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(format: Format, routing_key: Option<&str>) -> Webhook {
        Webhook {
            id: "wh-1".into(),
            name: "ops".into(),
            url: "https://hooks.example.net/pgwarden".into(),
            format,
            secret: "0123456789abcdef".into(),
            routing_key: routing_key.map(String::from),
            filter: Filter {
                types: vec!["agent_down".into()],
                clusters: vec!["main".into()],
                min_severity: Severity::Warning,
            },
            enabled: true,
            created_by: "admin".into(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn field(r: Result<(), (&'static str, String)>) -> &'static str {
        r.err().map(|e| e.0).unwrap_or("")
    }

    #[test]
    fn settings_are_checked_field_by_field() {
        assert!(check(&hook(Format::Json, None)).is_ok());
        assert!(check(&hook(Format::Pagerduty, Some("R0123"))).is_ok());
        assert_eq!(field(check(&hook(Format::Pagerduty, None))), "routing_key");
        assert_eq!(
            field(check(&hook(Format::Pagerduty, Some("")))),
            "routing_key"
        );
        assert_eq!(
            field(check(&hook(Format::Slack, Some("R0123")))),
            "routing_key"
        );
        for url in [
            "not a url",
            "ftp://x.example/",
            "/relative",
            "http://",
            "mailto:a@b.c",
        ] {
            let mut w = hook(Format::Json, None);
            w.url = url.into();
            assert_eq!(field(check(&w)), "url", "{url}");
        }
        let mut w = hook(Format::Json, None);
        w.url = "http://127.0.0.1:8080/hook?x=1".into();
        assert!(check(&w).is_ok());
        w.secret = "short".into();
        assert_eq!(field(check(&w)), "secret");
        let mut w = hook(Format::Json, None);
        w.name = "line\nbreak".into();
        assert_eq!(field(check(&w)), "name");
        let mut w = hook(Format::Json, None);
        w.filter.types = vec!["Agent Down".into()];
        assert_eq!(field(check(&w)), "event_types");
        let mut w = hook(Format::Json, None);
        w.filter.clusters = vec!["bad name".into()];
        assert_eq!(field(check(&w)), "clusters");
    }

    #[test]
    fn viewers_see_no_credentials_in_urls() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/XXXX"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:9000/h?k=v"),
            "http://127.0.0.1:9000/…"
        );
        let w = hook(Format::Json, None);
        assert_eq!(
            view_for(&w, Role::Viewer).url,
            "https://hooks.example.net/…"
        );
        assert_eq!(view_for(&w, Role::Admin).url, w.url);
        let shown = serde_json::to_string(&view_for(&w, Role::Admin)).expect("json");
        assert!(!shown.contains(&w.secret), "{shown}");
        assert!(shown.contains("\"secret_set\":true"), "{shown}");
    }
}
