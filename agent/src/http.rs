//! The agent's two HTTP servers: the unauthenticated health checks (Patroni-compatible, port
//! 8008 by default) with `/status` and `/metrics`, and the authenticated agent API (bearer
//! token, or a client certificate signed by the installation's CA; port 8443 by default) for
//! operations and the control plane's commands.

use crate::agent::{Op, OpRequest, Shared};
use crate::sys::now_ms;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgwarden_core::api::{FailoverRequest, OperationResult, Problem, SwitchoverRequest};
use pgwarden_core::health::{self, Check, CheckOptions, Clock};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// An RFC 9457 problem answer (`application/problem+json`).
pub(crate) fn problem(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(p)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn liveness_timeout_ms(shared: &Shared) -> u64 {
    (shared.cfg.node.loop_wait.0.as_millis() as u64 * 10).max(30_000)
}

/// The health-check router (no authentication).
pub fn health_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(status_handler))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .fallback(check_handler)
        .with_state(shared)
}

async fn status_handler(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.status()).into_response()
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        pgwarden_core::metrics::render(&shared.status()),
    )
        .into_response()
}

async fn check_handler(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let Some(check) = Check::from_path(req.uri().path()) else {
        return problem(Problem::new(
            404,
            "Not Found",
            format!("no health check at {}", req.uri().path()),
        ));
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return problem(Problem::new(
            405,
            "Method Not Allowed",
            "health checks answer GET, HEAD and OPTIONS",
        ));
    }
    let opts = match CheckOptions::from_query(req.uri().query()) {
        Ok(o) => o,
        Err(e) => return problem(Problem::new(400, "Bad Request", e).field("lag")),
    };
    let status = shared.status();
    let clock = Clock {
        now_ms: now_ms(),
        liveness_timeout_ms: liveness_timeout_ms(&shared),
    };
    let code = if health::passes(check, &status, opts, clock) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

/// The authenticated agent API router.
pub fn api_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(status_handler))
        .route("/v1/events", get(events_handler))
        .route("/v1/cluster", get(cluster_handler))
        .route("/v1/history", get(history_handler))
        .route("/v1/switchover", post(switchover))
        .route("/v1/failover", post(failover))
        .route("/v1/takeover", post(takeover))
        .route("/v1/restart", post(restart))
        .route("/v1/reinitialize", post(reinitialize))
        .route("/v1/config", get(get_config).patch(patch_config))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route(
            "/v1/commands",
            get(crate::commands::list_commands).post(crate::commands::post_command),
        )
        .route("/v1/commands/{id}", get(crate::commands::get_command))
        .merge(
            Router::new()
                .route("/v1/raft/append", post(raft_append))
                .route("/v1/raft/vote", post(raft_vote))
                .route("/v1/raft/snapshot", post(raft_snapshot))
                .route("/v1/raft/propose", post(raft_propose))
                .layer(middleware::from_fn_with_state(
                    shared.clone(),
                    require_peer_cert,
                )),
        )
        .fallback(|| async { problem(Problem::new(404, "Not Found", "no such API route")) })
        .layer(middleware::from_fn_with_state(shared.clone(), auth))
        .with_state(shared)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A bearer token (operators, the CLI, other agents) or the control plane's client
/// certificate (`CN = pgwarden-server`, signed by the installation's CA, pushing commands; the
/// TLS listener already refused revoked ones). Other CA-signed certificates (agents,
/// operators) still need the token.
async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let control_plane = req
        .extensions()
        .get::<crate::tls::PeerCert>()
        .and_then(|p| p.0.as_ref())
        .is_some_and(|id| id.is_control_plane());
    if control_plane {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), shared.token.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = problem(Problem::new(
                401,
                "Unauthorized",
                "a valid bearer token (Authorization: Bearer …) or the control plane's client certificate is required",
            ));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn cluster_handler(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.cluster_view()).into_response()
}

/// With TLS on, Raft traffic must come from a member of the installation: a client that
/// presented a certificate signed by the CA.
async fn require_peer_cert(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<crate::tls::PeerCert>()
        .is_some_and(|p| p.verified());
    if shared.cfg.tls.is_some() && !peer {
        return problem(Problem::new(
            403,
            "Forbidden",
            "Raft traffic needs a client certificate signed by the installation's CA",
        ));
    }
    next.run(req).await
}

async fn events_handler(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.events.recent()).into_response()
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
                let field = text
                    .split('`')
                    .nth(1)
                    .filter(|_| text.contains("field"))
                    .map(String::from);
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

async fn run_op(shared: Arc<Shared>, op: Op) -> Response {
    let name = op.name().to_string();
    let (tx, rx) = oneshot::channel();
    if shared.ops.send(OpRequest { op, reply: tx }).await.is_err() {
        return problem(Problem::new(
            503,
            "Unavailable",
            "the agent loop is not running",
        ));
    }
    // The operation runs inside the loop and completes even if this request goes away.
    match tokio::time::timeout(Duration::from_secs(3600), rx).await {
        Ok(Ok(Ok(message))) => Json(OperationResult {
            operation: name,
            ok: true,
            message,
            status: shared.status(),
        })
        .into_response(),
        Ok(Ok(Err(e))) => {
            let mut p = Problem::new(e.status, "Operation failed", e.message);
            p.field = e.field;
            problem(p)
        }
        _ => problem(Problem::new(
            504,
            "Timeout",
            format!("{name} did not answer"),
        )),
    }
}

/// `GET /v1/history`: the failover records in the replicated state, oldest first.
async fn history_handler(State(s): State<Arc<Shared>>) -> Response {
    Json(pgwarden_core::record::History {
        failovers: s.consensus.sm.state().failovers,
    })
    .into_response()
}

#[derive(serde::Deserialize, Default)]
struct Forwarded {
    #[serde(default)]
    forwarded: bool,
}

/// Relays a request to another member's API and its answer back.
async fn relay(shared: &Shared, member: &str, path: &str, body: serde_json::Value) -> Response {
    let Some(m) = shared.cfg.member(member) else {
        return problem(Problem::new(500, "Unknown member", member.to_string()));
    };
    let addr = format!("{}:{}", m.host, m.api_port);
    match shared
        .consensus
        .call(&addr, path, &body, Duration::from_secs(600))
        .await
    {
        Ok((code, v)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut r = (status, Json(v)).into_response();
            if code >= 400 {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/problem+json"),
                );
            }
            r
        }
        Err(e) => problem(Problem::new(
            502,
            "Member unreachable",
            format!("{member}'s agent does not answer: {e:#}"),
        )),
    }
}

/// `POST /v1/switchover`: runs on the lease holder; any other member forwards it there.
async fn switchover(
    State(s): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<Forwarded>,
    ApiJson(r): ApiJson<SwitchoverRequest>,
) -> Response {
    let at_ms = match r.scheduled_at.as_deref() {
        None => None,
        Some(t) => match pgwarden_core::timefmt::parse_rfc3339_ms(t) {
            Ok(ms) => Some(ms),
            Err(e) => {
                return problem(Problem::new(422, "Invalid request body", e).field("scheduled_at"))
            }
        },
    };
    if let Some(c) = &r.candidate {
        if s.cfg.member(c).is_none() {
            return problem(
                Problem::new(
                    422,
                    "Invalid request body",
                    format!(
                        "{c:?} is not a member ({})",
                        s.cfg.member_names().join(", ")
                    ),
                )
                .field("candidate"),
            );
        }
    }
    if s.lease.holding().is_none() {
        let st = s.consensus.sm.state();
        let holder = st
            .lease
            .as_ref()
            .filter(|l| !l.released && now_ms() < l.expires_at_ms)
            .map(|l| l.holder.clone());
        return match holder {
            Some(h) if h != s.cfg.node.name && !q.forwarded => {
                let body = serde_json::to_value(&r).unwrap_or_default();
                relay(&s, &h, "/v1/switchover?forwarded=true", body).await
            }
            _ => problem(Problem::new(
                409,
                "No primary",
                "no member holds the lease: there is no primary to switch over from (use a failover)",
            )),
        };
    }
    let scheduled = at_ms.is_some_and(|t| t > now_ms());
    let mut resp = run_op(
        s,
        Op::Switchover {
            candidate: r.candidate,
            at_ms,
        },
    )
    .await;
    if scheduled && resp.status() == StatusCode::OK {
        *resp.status_mut() = StatusCode::ACCEPTED;
    }
    resp
}

/// `POST /v1/failover`: runs on the candidate; any other member forwards it there.
async fn failover(
    State(s): State<Arc<Shared>>,
    axum::extract::Query(q): axum::extract::Query<Forwarded>,
    ApiJson(r): ApiJson<FailoverRequest>,
) -> Response {
    if s.cfg.member(&r.candidate).is_none() {
        return problem(
            Problem::new(
                422,
                "Invalid request body",
                format!(
                    "{:?} is not a member ({})",
                    r.candidate,
                    s.cfg.member_names().join(", ")
                ),
            )
            .field("candidate"),
        );
    }
    if r.candidate != s.cfg.node.name {
        if q.forwarded {
            return problem(Problem::new(
                409,
                "Misrouted",
                "forwarded to the wrong member",
            ));
        }
        let body = serde_json::to_value(&r).unwrap_or_default();
        return relay(&s, &r.candidate, "/v1/failover?forwarded=true", body).await;
    }
    run_op(s, Op::Failover).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeoverRequest {
    from: String,
    epoch: u64,
}

/// `POST /v1/takeover` (between agents): the old holder released the lease to this member.
async fn takeover(State(s): State<Arc<Shared>>, ApiJson(r): ApiJson<TakeoverRequest>) -> Response {
    run_op(
        s,
        Op::Takeover {
            from: r.from,
            epoch: r.epoch,
        },
    )
    .await
}
async fn restart(State(s): State<Arc<Shared>>) -> Response {
    run_op(s, Op::Restart).await
}
async fn reinitialize(State(s): State<Arc<Shared>>) -> Response {
    run_op(s, Op::Reinitialize).await
}

// ---- the replicated log ----

use crate::raft::TypeConfig;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use pgwarden_core::lease::Proposal;

async fn raft_append(
    State(s): State<Arc<Shared>>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Response {
    Json(s.consensus.raft.append_entries(req).await).into_response()
}

async fn raft_vote(State(s): State<Arc<Shared>>, Json(req): Json<VoteRequest<u64>>) -> Response {
    Json(s.consensus.raft.vote(req).await).into_response()
}

async fn raft_snapshot(
    State(s): State<Arc<Shared>>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Response {
    Json(s.consensus.raft.install_snapshot(req).await).into_response()
}

async fn raft_propose(State(s): State<Arc<Shared>>, Json(p): Json<Proposal>) -> Response {
    let r = s
        .consensus
        .propose_here(p)
        .await
        .map_err(|e| format!("{e:#}"));
    Json(r).into_response()
}

/// Maintenance mode through the replicated log: every member sees the same flag.
async fn set_paused(s: Arc<Shared>, paused: bool) -> Response {
    let (name, p) = if paused {
        ("pause", Proposal::Pause)
    } else {
        ("resume", Proposal::Resume)
    };
    match s.consensus.propose(p).await {
        Ok(crate::raft::Applied(Ok(()))) => {
            s.events.record(
                if paused { "paused" } else { "resumed" },
                format!("{name} committed to the replicated log"),
            );
            Json(OperationResult {
                operation: name.into(),
                ok: true,
                message: format!("{name} committed"),
                status: s.status(),
            })
            .into_response()
        }
        Ok(crate::raft::Applied(Err(e))) => {
            problem(Problem::new(409, "Operation refused", e.to_string()))
        }
        Err(e) => problem(Problem::new(503, "No quorum", format!("{name}: {e:#}"))),
    }
}

/// `GET /v1/config`: the cluster's dynamic configuration and its history.
async fn get_config(State(s): State<Arc<Shared>>) -> Response {
    let st = s.consensus.sm.state();
    Json(serde_json::json!({
        "config": st.config,
        "history": st.config_history,
    }))
    .into_response()
}

/// `PATCH /v1/config`: validated here, committed to the replicated log, applied by every node.
async fn patch_config(
    State(s): State<Arc<Shared>>,
    ApiJson(patch): ApiJson<pgwarden_core::dynconfig::ConfigPatch>,
) -> Response {
    let current = s.consensus.sm.state().config;
    if let Err(e) = pgwarden_core::dynconfig::apply_patch(&current, &patch) {
        let mut p = Problem::new(422, "Invalid configuration", e.message.clone());
        p.field = Some(e.field);
        return problem(p);
    }
    let proposal = Proposal::SetConfig {
        patch,
        by: format!("api via {}", s.cfg.node.name),
        now_ms: now_ms(),
    };
    match s.consensus.propose(proposal).await {
        Ok(crate::raft::Applied(Ok(()))) => {
            let st = s.consensus.sm.state();
            s.events.record(
                "config_changed",
                format!("configuration version {} committed", st.config.version),
            );
            Json(serde_json::json!({"config": st.config})).into_response()
        }
        Ok(crate::raft::Applied(Err(pgwarden_core::lease::Rejected::BadConfig(e)))) => {
            let mut p = Problem::new(422, "Invalid configuration", e.message.clone());
            p.field = Some(e.field);
            problem(p)
        }
        Ok(crate::raft::Applied(Err(e))) => problem(Problem::new(409, "Refused", e.to_string())),
        Err(e) => problem(Problem::new(503, "No quorum", format!("{e:#}"))),
    }
}

async fn pause(State(s): State<Arc<Shared>>) -> Response {
    set_paused(s, true).await
}

async fn resume(State(s): State<Arc<Shared>>) -> Response {
    set_paused(s, false).await
}
