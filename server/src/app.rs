//! The running server's shared state and its HTTP plumbing: problem documents, JSON bodies
//! whose errors name the field, query parameters checked one by one, the caller's identity
//! (bearer token → user and role) and the audit of every mutating call.

use crate::auth::{token_hash, Actor, Role};
use crate::store::{now_ms, Store};
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgwarden_core::api::Problem;
use pgwarden_core::server_config::ServerConfig;
use pgwarden_pki::certs::Ca;
use pgwarden_pki::tls::{PeerAddr, PeerCert};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub reports: AtomicU64,
    pub events_new: AtomicU64,
    pub commands_delivered: AtomicU64,
    pub delivery_failures: AtomicU64,
    pub webhook_attempts: AtomicU64,
    pub webhook_attempt_failures: AtomicU64,
    pub webhook_deliveries_failed: AtomicU64,
    pub api_4xx: AtomicU64,
    pub api_5xx: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct App {
    pub store: Store,
    pub cfg: ServerConfig,
    pub ca: Ca,
    /// This server's name in claims and leases.
    pub server_id: String,
    /// HTTPS client with the server's certificate, for agents.
    pub agents: reqwest::Client,
    /// Woken when events or commands are stored, for the live stream and the delivery loop.
    pub events_changed: Notify,
    pub commands_changed: Notify,
    /// Woken when a webhook delivery is queued outside an event (a test send) or finishes.
    pub webhooks_changed: Notify,
    /// HTTP(S) client for webhook receivers: the system's root certificates, no client
    /// certificate, `[webhooks] timeout`.
    pub webhooks: reqwest::Client,
    pub counters: Counters,
}

pub type Shared = Arc<App>;

pub fn problem(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(p)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

pub fn unprocessable(field: &str, detail: impl Into<String>) -> Response {
    problem(Problem::new(422, "Invalid request", detail).field(field))
}

pub fn bad_query(field: &str, detail: impl Into<String>) -> Response {
    problem(Problem::new(400, "Invalid query parameter", detail).field(field))
}

pub fn not_found(detail: impl Into<String>) -> Response {
    problem(Problem::new(404, "Not Found", detail))
}

pub fn conflict(field: &str, detail: impl Into<String>) -> Response {
    problem(Problem::new(409, "Conflict", detail).field(field))
}

/// A store failure: logged in full, answered without internals.
pub fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "request failed");
    problem(Problem::new(
        500,
        "Internal Server Error",
        "the server could not complete the request; see its log",
    ))
}

/// JSON bodies whose errors come back as problem documents naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;
    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                let text = rej.body_text();
                let field = field_of(&text);
                let status = match rej {
                    JsonRejection::JsonDataError(_) => 422,
                    JsonRejection::MissingJsonContentType(_) => 415,
                    _ => 400,
                };
                let mut p = Problem::new(status, "Invalid request body", text);
                p.field = field;
                Err(problem(p))
            }
        }
    }
}

/// The field a serde error is about: a path (`args.candidate: …`) or a named field
/// (``unknown field `x` ``, ``missing field `x` ``).
pub fn field_of(text: &str) -> Option<String> {
    if let Some(f) = text.split('`').nth(1).filter(|_| text.contains("field")) {
        return Some(f.to_string());
    }
    let after = text.split(": ").nth(1)?;
    let path = after.split(':').next()?.trim();
    (!path.is_empty() && !path.contains(' ')).then(|| path.to_string())
}

/// Query parameters, checked one by one so an error names the parameter.
pub struct QueryMap(pub HashMap<String, Vec<String>>);

impl QueryMap {
    pub fn from_uri(q: Option<&str>) -> QueryMap {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.entry(decode(k)).or_default().push(decode(v));
        }
        QueryMap(m)
    }

    /// Refuses parameters not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), Response> {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        match keys.into_iter().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(bad_query(
                k,
                format!("unknown parameter {k:?}; known: {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    pub fn str(&self, k: &str) -> Option<String> {
        self.0.get(k).and_then(|v| v.last()).cloned()
    }

    /// Every value of `k`, comma-separated lists split.
    pub fn list(&self, k: &str) -> Vec<String> {
        self.0
            .get(k)
            .map(|v| {
                v.iter()
                    .flat_map(|s| s.split(','))
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn int(&self, k: &str, min: i64, max: i64) -> Result<Option<i64>, Response> {
        match self.str(k) {
            None => Ok(None),
            Some(s) => match s.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(bad_query(
                    k,
                    format!("{s:?} is not a whole number from {min} to {max}"),
                )),
            },
        }
    }

    /// A time: RFC 3339 or milliseconds since the epoch.
    pub fn time(&self, k: &str) -> Result<Option<i64>, Response> {
        match self.str(k) {
            None => Ok(None),
            Some(s) => {
                if let Ok(ms) = s.parse::<i64>() {
                    return Ok(Some(ms));
                }
                pgwarden_core::timefmt::parse_rfc3339_ms(&s)
                    .map(|ms| Some(ms as i64))
                    .map_err(|e| bad_query(k, e))
            }
        }
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the audit middleware learns who made the call.
#[derive(Clone, Default)]
pub struct AuditSlot(pub Arc<Mutex<Option<String>>>);

/// An authenticated caller with at least role `R` (0 viewer, 1 operator, 2 admin).
pub struct Authed<const R: u8>(pub Actor);
pub type Viewer = Authed<0>;
pub type Operator = Authed<1>;
pub type Admin = Authed<2>;

fn role_of(r: u8) -> Role {
    match r {
        0 => Role::Viewer,
        1 => Role::Operator,
        _ => Role::Admin,
    }
}

impl<const R: u8> FromRequestParts<Shared> for Authed<R> {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Response> {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let unauthorized = |detail: &str| {
            let mut r = problem(Problem::new(401, "Unauthorized", detail));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        };
        let Some(token) = given else {
            return Err(unauthorized(
                "an API token is required (Authorization: Bearer …)",
            ));
        };
        let found = app
            .store
            .token_user(&token_hash(token), now_ms())
            .await
            .map_err(internal)?;
        let Some((token_id, user, role)) = found else {
            return Err(unauthorized(
                "the API token is not valid (unknown, expired, or its user is disabled)",
            ));
        };
        let role = Role::parse(&role).unwrap_or(Role::Viewer);
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            if let Ok(mut s) = slot.0.lock() {
                *s = Some(user.clone());
            }
        }
        let need = role_of(R);
        if role < need {
            return Err(problem(Problem::new(
                403,
                "Forbidden",
                format!(
                    "this call needs the {} role; {user} is {}",
                    need.as_str(),
                    role.as_str()
                ),
            )));
        }
        Ok(Authed(Actor {
            user,
            role,
            token_id,
        }))
    }
}

/// An enrolled agent: a client certificate signed by the CA, recorded by the server, not
/// revoked. `CN` is the node, `OU` the cluster.
pub struct AgentIdentity {
    pub cluster: String,
    pub node: String,
    pub fingerprint: String,
}

impl FromRequestParts<Shared> for AgentIdentity {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Response> {
        let forbidden = |d: &str| problem(Problem::new(403, "Forbidden", d.to_string()));
        let Some(id) = parts.extensions.get::<PeerCert>().and_then(|p| p.0.clone()) else {
            return Err(forbidden(
                "agents authenticate with the certificate they received at enrollment",
            ));
        };
        let cert = app
            .store
            .certificate(&id.fingerprint)
            .await
            .map_err(internal)?;
        match cert {
            Some(c) if c.revoked_ms.is_none() => {
                if let Some(slot) = parts.extensions.get::<AuditSlot>() {
                    if let Ok(mut s) = slot.0.lock() {
                        *s = Some(format!("agent:{}/{}", c.cluster, c.node));
                    }
                }
                Ok(AgentIdentity {
                    cluster: c.cluster,
                    node: c.node,
                    fingerprint: c.fingerprint,
                })
            }
            Some(_) => Err(forbidden("this certificate was revoked")),
            None => Err(forbidden(
                "this certificate was not issued by this installation's enrollment",
            )),
        }
    }
}

/// The caller's address: the TCP peer, and `X-Forwarded-For` when a load balancer sets it.
pub fn remote_of(req: &Request) -> String {
    let peer = req
        .extensions()
        .get::<PeerAddr>()
        .map(|a| a.0.to_string())
        .unwrap_or_default();
    match req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(f) => format!("{f} via {peer}"),
        None => peer,
    }
}

/// Records every mutating API call (who, what, when, from where, with what outcome), and
/// counts error answers.
pub async fn audit(State(app): State<Shared>, mut req: Request, next: Next) -> Response {
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let remote = remote_of(&req);
    let resp = next.run(req).await;
    let status = resp.status();
    if status.is_client_error() {
        Counters::inc(&app.counters.api_4xx);
    } else if status.is_server_error() {
        Counters::inc(&app.counters.api_5xx);
    }
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Agent reports arrive every few seconds from every node: they are not operator actions.
    if mutating && path != "/api/v1/agent/report" {
        let actor = slot
            .0
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(|| "anonymous".into());
        if let Err(e) = app
            .store
            .audit(&actor, method.as_str(), &path, status.as_u16(), &remote, "")
            .await
        {
            tracing::error!(error = %format!("{e:#}"), "cannot write the audit record");
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded_and_checked_by_name() {
        let q = QueryMap::from_uri(Some("cluster=main&type=promoted,fenced&type=lease_lost&since=2026-11-22T10%3A00%3A00Z&x+y=a%20b"));
        assert_eq!(q.str("cluster").as_deref(), Some("main"));
        assert_eq!(q.list("type"), vec!["promoted", "fenced", "lease_lost"]);
        assert_eq!(q.str("x y").as_deref(), Some("a b"));
        assert!(q.time("since").expect("time").is_some());
        let bad = QueryMap::from_uri(Some("limit=0"));
        assert!(bad.int("limit", 1, 1000).is_err());
        assert!(QueryMap::from_uri(Some("limt=3")).only(&["limit"]).is_err());
        assert_eq!(decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn serde_errors_name_their_field() {
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: unknown field `kinds`, expected one of `kind`").as_deref(),
            Some("kinds")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: timeout: invalid type: integer `5`, expected a string at line 1 column 20").as_deref(),
            Some("timeout")
        );
    }
}
