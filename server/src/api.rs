//! The REST API under `/api/v1` (for automation and `pgwardenctl`), the agents' routes
//! (enrollment, reports), and `/healthz`, `/readyz`, `/metrics`. Webhook routes are in
//! `api/webhooks.rs`.

use crate::app::{
    audit, bad_query, conflict, field_of, internal, not_found, problem, unprocessable, Admin,
    AgentIdentity, ApiJson, Authed, Counters, Operator, QueryMap, Shared, Viewer,
};
use crate::auth::{self, Role};
use crate::store::{
    now_ms, ApiTokenRow, AuditRow, CertificateRow, CommandRow, ConfigChange, EventFilter, EventRow,
    JoinTokenRow, LagSample, NewCommand, NodeRow, UserRow,
};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgwarden_core::api::Problem;
use pgwarden_core::control::{
    AgentReport, CommandKind, CommandPhase, EnrollRequest, EnrollResponse, RenewRequest, ReportAck,
};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use utoipa::{OpenApi, ToSchema};

mod webhooks;

pub fn router(app: Shared) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/clusters", get(list_clusters))
        .route("/clusters/{cluster}", get(get_cluster))
        .route("/clusters/{cluster}/nodes", get(cluster_nodes))
        .route(
            "/clusters/{cluster}/nodes/{node}",
            get(get_node).delete(remove_node),
        )
        .route(
            "/clusters/{cluster}/commands",
            post(create_command).get(cluster_commands),
        )
        .route(
            "/clusters/{cluster}/config",
            get(get_config).patch(patch_config),
        )
        .route("/clusters/{cluster}/config/history", get(config_history))
        .route("/clusters/{cluster}/lag", get(lag_history))
        .route("/clusters/{cluster}/failovers", get(failovers))
        .route("/nodes", get(all_nodes))
        .route("/events", get(list_events))
        .route("/events/stream", get(stream_events))
        .route("/commands", get(list_commands))
        .route("/commands/{id}", get(get_command))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", axum::routing::delete(delete_token))
        .route(
            "/join-tokens",
            get(list_join_tokens).post(create_join_token),
        )
        .route(
            "/join-tokens/{id}",
            axum::routing::delete(delete_join_token),
        )
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{name}",
            axum::routing::patch(update_user).delete(delete_user),
        )
        .route("/certificates", get(list_certificates))
        .route(
            "/certificates/{fingerprint}/revoke",
            post(revoke_certificate),
        )
        .route("/audit", get(audit_log))
        .route(
            "/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route(
            "/webhooks/{id}",
            get(webhooks::get_webhook)
                .patch(webhooks::update_webhook)
                .delete(webhooks::delete_webhook),
        )
        .route("/webhooks/{id}/test", post(webhooks::test_webhook))
        .route(
            "/webhooks/{id}/deliveries",
            get(webhooks::webhook_deliveries),
        )
        .route("/enroll/ca", get(enroll_ca))
        .route("/enroll", post(enroll))
        .route("/agent/report", post(agent_report))
        .route("/agent/renew", post(agent_renew))
        .fallback(|| async { not_found("no such API route") });
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(app.clone(), audit))
        .with_state(app)
}

// ---- OpenAPI ----

#[derive(OpenApi)]
#[openapi(
    info(title = "pgwarden-server API", description = "The control plane of pgwarden: clusters, nodes, events, commands, configuration, tokens, users. Errors are application/problem+json documents naming the bad field."),
    paths(
        login, me, list_clusters, get_cluster, cluster_nodes, get_node, remove_node,
        create_command, cluster_commands, get_config, patch_config, config_history,
        lag_history, failovers, all_nodes, list_events, stream_events, list_commands,
        get_command, list_tokens, create_token, delete_token, list_join_tokens,
        create_join_token, delete_join_token, list_users, create_user, update_user,
        delete_user, list_certificates, revoke_certificate, audit_log,
        webhooks::list_webhooks, webhooks::create_webhook, webhooks::get_webhook,
        webhooks::update_webhook, webhooks::delete_webhook, webhooks::test_webhook,
        webhooks::webhook_deliveries, enroll_ca, enroll, agent_report, agent_renew, healthz,
        readyz, metrics
    ),
    components(schemas(ProblemDoc)),
    modifiers(&BearerAuth, &ProblemResponses)
)]
pub struct ApiDoc;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// What the annotations cannot say once for every operation: error answers are
/// `application/problem+json`; a JSON body that does not parse is a 400 and one sent without
/// `Content-Type: application/json` a 415; and an `Option<Value>` documented as `Object` is
/// also `null`.
struct ProblemResponses;
impl utoipa::Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{Schema, SchemaType, Type};
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        const JSON: &str = "application/json";
        const PROBLEM: &str = "application/problem+json";
        let problem_ref = Ref::from_schema_name("ProblemDoc");
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                for resp in op.responses.responses.values_mut() {
                    let RefOr::T(r) = resp else { continue };
                    let is_problem = r.content.get(JSON).is_some_and(
                        |c| matches!(&c.schema, Some(RefOr::Ref(x)) if *x == problem_ref),
                    );
                    if is_problem {
                        if let Some(c) = r.content.shift_remove(JSON) {
                            r.content.insert(PROBLEM.into(), c);
                        }
                    }
                }
                if op.request_body.is_some() {
                    for (code, what) in [
                        ("400", "the body is not JSON"),
                        ("415", "the body is not sent as application/json"),
                    ] {
                        op.responses
                            .responses
                            .entry(code.into())
                            .or_insert_with(|| {
                                ResponseBuilder::new()
                                    .description(what)
                                    .content(
                                        PROBLEM,
                                        ContentBuilder::new()
                                            .schema(Some(problem_ref.clone()))
                                            .build(),
                                    )
                                    .build()
                                    .into()
                            });
                    }
                }
            }
        }
        // `Option<serde_json::Value>` fields documented as `value_type = Object`: null until set.
        let nullable = [("CommandRow", "result"), ("ConfigChange", "before")];
        if let Some(c) = openapi.components.as_mut() {
            for (schema, field) in nullable {
                if let Some(RefOr::T(Schema::Object(o))) = c.schemas.get_mut(schema) {
                    if let Some(RefOr::T(Schema::Object(p))) = o.properties.get_mut(field) {
                        p.schema_type = SchemaType::Array(vec![Type::Object, Type::Null]);
                    }
                }
            }
        }
    }
}

/// The OpenAPI document, as served and as kept in `docs/openapi.json`.
pub fn openapi_text() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".into())
}

async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

/// An RFC 9457 problem document.
#[derive(Serialize, ToSchema)]
pub struct ProblemDoc {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field or query parameter at fault.
    pub field: Option<String>,
}

fn check_cluster_name(s: &str) -> Result<(), Response> {
    if auth::valid_name(s) {
        Ok(())
    } else {
        Err(unprocessable(
            "cluster",
            format!("{s:?} is not a valid cluster name"),
        ))
    }
}

async fn require_cluster(app: &Shared, cluster: &str) -> Result<(), Response> {
    match app.store.cluster_exists(cluster).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(not_found(format!("no cluster named {cluster:?}"))),
        Err(e) => Err(internal(e)),
    }
}

// ---- login and identity ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    /// Lifetime of the session token (`12h` by default).
    #[schema(pattern = "^[0-9]+(ms|s|m|min|h|d)?$")]
    pub ttl: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TokenCreated {
    pub id: String,
    /// The token itself: shown once, stored only as a hash.
    pub token: String,
    pub user: String,
    pub expires_ms: Option<i64>,
}

fn parse_ttl(
    field: &str,
    s: Option<&str>,
    default_ms: Option<i64>,
) -> Result<Option<i64>, Response> {
    match s {
        None => Ok(default_ms.map(|d| now_ms() + d)),
        Some(t) => match pgwarden_core::duration::parse_duration(t) {
            Ok(d) if d.as_millis() > 0 => match ms_from_now(d) {
                Some(at) => Ok(Some(at)),
                None => Err(unprocessable(field, "too long")),
            },
            Ok(_) => Err(unprocessable(field, "must be longer than 0")),
            Err(e) => Err(unprocessable(field, e)),
        },
    }
}

/// The time `d` from now in ms since the epoch, unless that does not fit in an `i64`.
fn ms_from_now(d: std::time::Duration) -> Option<i64> {
    i64::try_from(d.as_millis())
        .ok()
        .and_then(|ms| now_ms().checked_add(ms))
}

/// Exchange a user's password for an API token.
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest,
    responses((status = 201, body = TokenCreated), (status = 401, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn login(State(app): State<Shared>, ApiJson(r): ApiJson<LoginRequest>) -> Response {
    let expires = match parse_ttl("ttl", r.ttl.as_deref(), Some(12 * 3600 * 1000)) {
        Ok(e) => e,
        Err(resp) => return resp,
    };
    let user = match app.store.user(&r.user).await {
        Ok(u) => u,
        Err(e) => return internal(e),
    };
    let ok =
        matches!(&user, Some((u, Some(h))) if !u.disabled && auth::verify_password(&r.password, h));
    if !ok {
        return problem(Problem::new(
            401,
            "Unauthorized",
            "unknown user or wrong password",
        ));
    }
    issue_token(&app, &r.user, "login", expires).await
}

async fn issue_token(app: &Shared, user: &str, name: &str, expires: Option<i64>) -> Response {
    let (token, id) = match (auth::new_api_token(), auth::random_hex(8)) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return internal(e),
    };
    if let Err(e) = app
        .store
        .create_api_token(&id, user, name, &auth::token_hash(&token), expires)
        .await
    {
        return internal(e);
    }
    (
        StatusCode::CREATED,
        Json(TokenCreated {
            id,
            token,
            user: user.into(),
            expires_ms: expires,
        }),
    )
        .into_response()
}

#[derive(Serialize, ToSchema)]
pub struct Me {
    pub user: String,
    pub role: String,
    pub token_id: String,
}

/// Who the token belongs to.
#[utoipa::path(get, path = "/api/v1/me", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = ProblemDoc)))]
async fn me(Authed(a): Viewer) -> Response {
    Json(Me {
        user: a.user,
        role: a.role.as_str().into(),
        token_id: a.token_id,
    })
    .into_response()
}

// ---- clusters and nodes ----

#[derive(Serialize, ToSchema)]
pub struct ClusterSummary {
    pub name: String,
    /// The node running as a writable primary, if any.
    pub primary: Option<String>,
    pub replicas_up: usize,
    pub replicas_total: usize,
    pub nodes_down: usize,
    /// The largest replica lag in bytes.
    pub worst_lag_bytes: Option<i64>,
    /// `off`, `on` or `strict`, as the primary reports it.
    pub synchronous_mode: Option<String>,
    pub paused: bool,
    /// A replica could take over now.
    pub failover_ready: Option<bool>,
    pub last_event: Option<EventRow>,
}

fn summarize(name: &str, nodes: &[NodeRow], last: Option<EventRow>) -> ClusterSummary {
    let primary = nodes
        .iter()
        .find(|n| n.role == "primary" && n.pg_state == "running" && n.agent_up);
    let replicas: Vec<&NodeRow> = nodes.iter().filter(|n| n.role != "primary").collect();
    let consensus = |n: &NodeRow| n.status.get("consensus").cloned();
    let src = primary.or(nodes.first());
    ClusterSummary {
        name: name.into(),
        primary: primary.map(|p| p.name.clone()),
        replicas_up: replicas
            .iter()
            .filter(|n| n.agent_up && n.pg_state == "running")
            .count(),
        replicas_total: replicas.len(),
        nodes_down: nodes.iter().filter(|n| !n.agent_up).count(),
        worst_lag_bytes: replicas.iter().filter_map(|n| n.lag_bytes).max(),
        synchronous_mode: src.and_then(consensus).and_then(|c| {
            c.get("synchronous_mode")
                .and_then(|v| v.as_str().map(String::from))
        }),
        paused: src
            .and_then(consensus)
            .and_then(|c| c.get("paused").and_then(|v| v.as_bool()))
            .unwrap_or(false),
        failover_ready: src.and_then(|n| {
            n.status
                .get("failover_readiness")
                .and_then(|r| r.get("ready"))
                .and_then(|v| v.as_bool())
        }),
        last_event: last,
    }
}

/// Every cluster with its health at a glance.
#[utoipa::path(get, path = "/api/v1/clusters", security(("bearer" = [])),
    responses((status = 200, body = [ClusterSummary]), (status = 401, body = ProblemDoc)))]
async fn list_clusters(_v: Viewer, State(app): State<Shared>) -> Response {
    let (clusters, nodes) = match (app.store.clusters().await, app.store.nodes(None).await) {
        (Ok(c), Ok(n)) => (c, n),
        (Err(e), _) | (_, Err(e)) => return internal(e),
    };
    let mut out = Vec::new();
    for (name, _) in clusters {
        let mine: Vec<NodeRow> = nodes
            .iter()
            .filter(|n| n.cluster == name)
            .cloned()
            .collect();
        let last = app.store.last_event(&name).await.unwrap_or(None);
        out.push(summarize(&name, &mine, last));
    }
    Json(out).into_response()
}

#[derive(Serialize, ToSchema)]
pub struct ClusterDetail {
    #[serde(flatten)]
    pub summary: ClusterSummary,
    pub nodes: Vec<NodeRow>,
}

/// One cluster with its nodes.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}", security(("bearer" = [])),
    params(("cluster" = String, Path)),
    responses((status = 200, body = ClusterDetail), (status = 404, body = ProblemDoc)))]
async fn get_cluster(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    let nodes = match app.store.nodes(Some(&cluster)).await {
        Ok(n) => n,
        Err(e) => return internal(e),
    };
    let last = app.store.last_event(&cluster).await.unwrap_or(None);
    Json(ClusterDetail {
        summary: summarize(&cluster, &nodes, last),
        nodes,
    })
    .into_response()
}

/// The nodes of one cluster.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/nodes", security(("bearer" = [])),
    params(("cluster" = String, Path)),
    responses((status = 200, body = [NodeRow]), (status = 404, body = ProblemDoc)))]
async fn cluster_nodes(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    match app.store.nodes(Some(&cluster)).await {
        Ok(n) => Json(n).into_response(),
        Err(e) => internal(e),
    }
}

/// Every node of every cluster.
#[utoipa::path(get, path = "/api/v1/nodes", security(("bearer" = [])),
    responses((status = 200, body = [NodeRow]), (status = 401, body = ProblemDoc)))]
async fn all_nodes(_v: Viewer, State(app): State<Shared>) -> Response {
    match app.store.nodes(None).await {
        Ok(n) => Json(n).into_response(),
        Err(e) => internal(e),
    }
}

/// One node.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/nodes/{node}", security(("bearer" = [])),
    params(("cluster" = String, Path), ("node" = String, Path)),
    responses((status = 200, body = NodeRow), (status = 404, body = ProblemDoc)))]
async fn get_node(
    _v: Viewer,
    State(app): State<Shared>,
    Path((cluster, node)): Path<(String, String)>,
) -> Response {
    match app.store.node(&cluster, &node).await {
        Ok(Some(n)) => Json(n).into_response(),
        Ok(None) => not_found(format!("no node {node:?} in cluster {cluster:?}")),
        Err(e) => internal(e),
    }
}

/// Removes a node from the inventory and revokes its certificates: its agent can no longer
/// reach the server, and other agents refuse it once they learn the revocation.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/nodes/{node}", security(("bearer" = [])),
    params(("cluster" = String, Path), ("node" = String, Path)),
    responses((status = 200, description = "removed; `revoked` certificates"), (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
async fn remove_node(
    Authed(a): Admin,
    State(app): State<Shared>,
    Path((cluster, node)): Path<(String, String)>,
) -> Response {
    let removed = match app.store.remove_node(&cluster, &node).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let revoked = match app
        .store
        .revoke(None, Some((&cluster, &node)), &a.user)
        .await
    {
        Ok(n) => n,
        Err(e) => return internal(e),
    };
    if !removed && revoked == 0 {
        return not_found(format!("no node {node:?} in cluster {cluster:?}"));
    }
    let _ = app
        .store
        .insert_event(
            &format!("server-node_removed-{cluster}-{node}-{}", now_ms()),
            &cluster,
            &node,
            "node_removed",
            &format!("removed by {}; {revoked} certificate(s) revoked", a.user),
        )
        .await;
    app.events_changed.notify_waiters();
    Json(serde_json::json!({"removed": removed, "revoked": revoked})).into_response()
}

// ---- events ----

#[derive(Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventRow>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn event_filter(q: &QueryMap, stream: bool) -> Result<EventFilter, Response> {
    let mut known = vec!["cluster", "node", "type", "since", "until"];
    if !stream {
        known.extend(["cursor", "limit"]);
    } else {
        known.push("after");
    }
    q.only(&known)?;
    let after = match q.str("cursor") {
        None => None,
        Some(c) => {
            let parsed = c
                .split_once('.')
                .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)));
            match parsed {
                Some(p) => Some(p),
                None => {
                    return Err(bad_query(
                        "cursor",
                        format!("{c:?} is not a cursor from a previous page"),
                    ))
                }
            }
        }
    };
    Ok(EventFilter {
        cluster: q.str("cluster"),
        node: q.str("node"),
        kinds: q.list("type"),
        since_ms: q.time("since")?,
        until_ms: q.time("until")?,
        after,
        after_seq: if stream {
            q.int("after", 0, i64::MAX)?
        } else {
            None
        },
        limit: q.int("limit", 1, 1000)?.unwrap_or(100),
    })
}

/// The event log, oldest first, filtered by cluster, node, type (comma-separated or
/// repeated) and time (RFC 3339 or ms), `limit` per page (100 by default, at most 1000).
#[utoipa::path(get, path = "/api/v1/events", security(("bearer" = [])),
    params(("cluster" = Option<String>, Query), ("node" = Option<String>, Query),
        ("type" = Option<String>, Query, description = "event types, comma-separated"),
        ("since" = Option<String>, Query), ("until" = Option<String>, Query),
        ("cursor" = Option<String>, Query), ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000)),
    responses((status = 200, body = EventPage), (status = 400, body = ProblemDoc), (status = 401, body = ProblemDoc)))]
async fn list_events(_v: Viewer, State(app): State<Shared>, req: Request) -> Response {
    let q = QueryMap::from_uri(req.uri().query());
    let f = match event_filter(&q, false) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let mut f2 = f.clone();
    f2.limit = f.limit + 1;
    let mut items = match app.store.events(&f2).await {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    let more = items.len() as i64 > f.limit;
    items.truncate(f.limit as usize);
    let next_cursor = if more {
        items.last().map(|e| format!("{}.{}", e.ts_ms, e.seq))
    } else {
        None
    };
    Json(EventPage { items, next_cursor }).into_response()
}

/// The live event stream (Server-Sent Events): every event stored from now on (or after
/// `after` / the `Last-Event-ID` header, a `seq`), matching the filters. Each SSE message has
/// `id` = the event's `seq` and `data` = the event as JSON.
#[utoipa::path(get, path = "/api/v1/events/stream", security(("bearer" = [])),
    params(("cluster" = Option<String>, Query), ("node" = Option<String>, Query),
        ("type" = Option<String>, Query), ("after" = Option<i64>, Query, minimum = 0)),
    responses((status = 200, description = "text/event-stream"), (status = 400, body = ProblemDoc), (status = 401, body = ProblemDoc)))]
async fn stream_events(_v: Viewer, State(app): State<Shared>, req: Request) -> Response {
    let q = QueryMap::from_uri(req.uri().query());
    let mut f = match event_filter(&q, true) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let last_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let start = match last_id.or(f.after_seq) {
        Some(s) => s,
        None => match crate::workers::max_event_seq(&app).await {
            Ok(s) => s,
            Err(e) => return internal(e),
        },
    };
    f.limit = 500;
    let stream = crate::workers::event_stream(app.clone(), f, start);
    Sse::new(futures_util::StreamExt::map(stream, |e: EventRow| {
        Ok::<_, Infallible>(
            SseEvent::default()
                .id(e.seq.to_string())
                .event("event")
                .data(serde_json::to_string(&e).unwrap_or_default()),
        )
    }))
    .keep_alive(KeepAlive::default())
    .into_response()
}

// ---- commands ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    /// `switchover`, `failover`, `restart`, `reinitialize`, `pause`, `resume` or `config`.
    #[schema(pattern = "^(switchover|failover|restart|reinitialize|pause|resume|config)$")]
    pub kind: String,
    /// The node a restart or reinitialization acts on.
    pub node: Option<String>,
    /// The agent API body: `{"candidate": "n2", "scheduled_at": "…"}` for a switchover,
    /// `{"candidate": "n2"}` for a failover, a configuration patch for `config`, `{}` or
    /// absent otherwise.
    #[schema(value_type = Object)]
    pub args: Option<serde_json::Value>,
    /// How long to wait for the outcome (`5m` by default, at least `1s`).
    #[schema(pattern = "^[0-9]+(ms|s|m|min|h|d)?$")]
    pub timeout: Option<String>,
    /// Alternative to the `Idempotency-Key` header.
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
}

/// Checks a command's arguments the way the agent will, so the caller gets a 422 naming the
/// field now rather than a failed command later.
fn check_args(kind: CommandKind, args: &serde_json::Value) -> Result<(), Response> {
    let field_err = |e: serde_json::Error| {
        let text = e.to_string();
        let f = field_of(&text)
            .map(|f| format!("args.{f}"))
            .unwrap_or_else(|| "args".into());
        unprocessable(&f, text)
    };
    match kind {
        CommandKind::Switchover => {
            let r: pgwarden_core::api::SwitchoverRequest =
                serde_json::from_value(args.clone()).map_err(field_err)?;
            if let Some(t) = &r.scheduled_at {
                pgwarden_core::timefmt::parse_rfc3339_ms(t)
                    .map_err(|e| unprocessable("args.scheduled_at", e))?;
            }
        }
        CommandKind::Failover => {
            serde_json::from_value::<pgwarden_core::api::FailoverRequest>(args.clone())
                .map_err(field_err)?;
        }
        CommandKind::Config => {
            serde_json::from_value::<pgwarden_core::dynconfig::ConfigPatch>(args.clone())
                .map_err(field_err)?;
        }
        _ => {
            if !(args.is_null() || args.as_object().is_some_and(|o| o.is_empty())) {
                return Err(unprocessable(
                    "args",
                    format!("{} takes no arguments", kind.as_str()),
                ));
            }
        }
    }
    Ok(())
}

/// Queues a command for the cluster's agents. With the same idempotency key (header
/// `Idempotency-Key` or field `idempotency_key`) the first command is returned (200) instead
/// of a new one (202). The command goes queued → delivered → running → succeeded / failed,
/// or timed_out.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/commands", security(("bearer" = [])),
    params(("cluster" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = CreateCommand,
    responses((status = 202, body = CommandRow), (status = 200, body = CommandRow),
        (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc), (status = 409, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn create_command(
    Authed(a): Operator,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    ApiJson(c): ApiJson<CreateCommand>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    let Some(kind) = CommandKind::parse(&c.kind) else {
        return unprocessable(
            "kind",
            format!(
                "{:?} is not a command; one of: {}",
                c.kind,
                CommandKind::ALL.map(|k| k.as_str()).join(", ")
            ),
        );
    };
    let args = c.args.clone().unwrap_or(serde_json::Value::Null);
    if let Err(r) = check_args(kind, &args) {
        return r;
    }
    queue_command(
        &app,
        &a.user,
        &cluster,
        kind,
        c.node.as_deref(),
        &args,
        c.timeout.as_deref(),
        idem_key(&headers, c.idempotency_key.as_deref()),
    )
    .await
}

fn idem_key(headers: &HeaderMap, body: Option<&str>) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or(body.map(String::from))
}

#[allow(clippy::too_many_arguments)]
async fn queue_command(
    app: &Shared,
    user: &str,
    cluster: &str,
    kind: CommandKind,
    node: Option<&str>,
    args: &serde_json::Value,
    timeout: Option<&str>,
    key: Option<String>,
) -> Response {
    if kind.node_level() {
        let Some(n) = node else {
            return unprocessable(
                "node",
                format!("{} needs the node to act on", kind.as_str()),
            );
        };
        match app.store.node(cluster, n).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return unprocessable("node", format!("no node {n:?} in cluster {cluster:?}"))
            }
            Err(e) => return internal(e),
        }
    } else if node.is_some() {
        return unprocessable(
            "node",
            format!("{} is a cluster command: it takes no node", kind.as_str()),
        );
    }
    let timeout_ms = match timeout {
        None => app.cfg.commands.timeout.0.as_millis() as i64,
        Some(t) => match pgwarden_core::duration::parse_duration(t) {
            Ok(d) if d.as_millis() >= 1000 => match ms_from_now(d) {
                Some(_) => d.as_millis() as i64,
                None => return unprocessable("timeout", "too long"),
            },
            Ok(_) => return unprocessable("timeout", "must be at least 1s"),
            Err(e) => return unprocessable("timeout", e),
        },
    };
    if let Some(k) = &key {
        if k.is_empty() || k.len() > 200 {
            return unprocessable("idempotency_key", "must be 1 to 200 characters");
        }
    }
    let id = match auth::random_hex(12) {
        Ok(h) => format!("cmd-{h}"),
        Err(e) => return internal(e),
    };
    let key = key.unwrap_or_else(|| id.clone());
    let args = if args.is_null() {
        serde_json::json!({})
    } else {
        args.clone()
    };
    let res = app
        .store
        .insert_command(&NewCommand {
            id: &id,
            idempotency_key: &key,
            cluster,
            node,
            kind,
            args: &args,
            created_by: user,
            deadline_ms: now_ms().saturating_add(timeout_ms),
        })
        .await;
    match res {
        Ok((row, true)) => {
            app.commands_changed.notify_waiters();
            (StatusCode::ACCEPTED, Json(row)).into_response()
        }
        Ok((row, false)) => {
            if row.kind != kind {
                return conflict(
                    "idempotency_key",
                    format!(
                        "this key was used for command {} ({})",
                        row.id,
                        row.kind.as_str()
                    ),
                );
            }
            (StatusCode::OK, Json(row)).into_response()
        }
        Err(e) => internal(e),
    }
}

#[derive(Serialize, ToSchema)]
pub struct CommandPage {
    pub items: Vec<CommandRow>,
    pub next_cursor: Option<String>,
}

async fn commands_page(app: &Shared, cluster: Option<&str>, query: Option<String>) -> Response {
    let q = QueryMap::from_uri(query.as_deref());
    let known: &[&str] = if cluster.is_some() {
        &["state", "cursor", "limit"]
    } else {
        &["cluster", "state", "cursor", "limit"]
    };
    if let Err(r) = q.only(known) {
        return r;
    }
    let state = match q.str("state") {
        None => None,
        Some(s) => match CommandPhase::parse(&s) {
            Some(p) => Some(p),
            None => return bad_query("state", format!("{s:?} is not a command state")),
        },
    };
    let before = match q.str("cursor") {
        None => None,
        Some(c) => match c
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.to_string())))
        {
            Some(p) => Some(p),
            None => {
                return bad_query(
                    "cursor",
                    format!("{c:?} is not a cursor from a previous page"),
                )
            }
        },
    };
    let limit = match q.int("limit", 1, 500) {
        Ok(l) => l.unwrap_or(50),
        Err(r) => return r,
    };
    let cluster = cluster.map(String::from).or(q.str("cluster"));
    let mut items = match app
        .store
        .commands(cluster.as_deref(), state, before, limit + 1)
        .await
    {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(|c| format!("{}.{}", c.created_ms, c.id))
    } else {
        None
    };
    Json(CommandPage { items, next_cursor }).into_response()
}

/// The commands of one cluster, newest first.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/commands", security(("bearer" = [])),
    params(("cluster" = String, Path), ("state" = Option<String>, Query), ("cursor" = Option<String>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, body = CommandPage), (status = 400, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
async fn cluster_commands(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
    req: Request,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    commands_page(&app, Some(&cluster), req.uri().query().map(String::from)).await
}

/// Every command, newest first.
#[utoipa::path(get, path = "/api/v1/commands", security(("bearer" = [])),
    params(("cluster" = Option<String>, Query), ("state" = Option<String>, Query), ("cursor" = Option<String>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, body = CommandPage), (status = 400, body = ProblemDoc)))]
async fn list_commands(_v: Viewer, State(app): State<Shared>, req: Request) -> Response {
    commands_page(&app, None, req.uri().query().map(String::from)).await
}

/// One command and where it is.
#[utoipa::path(get, path = "/api/v1/commands/{id}", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = CommandRow), (status = 404, body = ProblemDoc)))]
async fn get_command(_v: Viewer, State(app): State<Shared>, Path(id): Path<String>) -> Response {
    match app.store.command(&id).await {
        Ok(Some(c)) => Json(c).into_response(),
        Ok(None) => not_found(format!("no command {id:?}")),
        Err(e) => internal(e),
    }
}

// ---- configuration ----

#[derive(Serialize, ToSchema)]
pub struct ClusterConfig {
    /// The dynamic configuration the agents replicate.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// The agent that answered, or `null` when this is the stored copy.
    pub fetched_from: Option<String>,
}

/// The live dynamic configuration from a reachable agent (the stored copy when none answers).
async fn current_config(app: &Shared, cluster: &str) -> Result<ClusterConfig, Response> {
    let nodes = app.store.nodes(Some(cluster)).await.map_err(internal)?;
    for n in nodes.iter().filter(|n| n.agent_up && !n.api_url.is_empty()) {
        let url = format!("{}/v1/config", n.api_url.trim_end_matches('/'));
        let answer = match app.agents.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
            _ => None,
        };
        if let Some(c) = answer.as_ref().and_then(|v| v.get("config")) {
            let _ = app.store.set_cluster_config(cluster, c).await;
            return Ok(ClusterConfig {
                config: c.clone(),
                fetched_from: Some(n.name.clone()),
            });
        }
    }
    Err(problem(Problem::new(
        503,
        "Service Unavailable",
        "no agent of this cluster answered; the configuration lives in the agents' replicated state",
    )))
}

/// The cluster's dynamic configuration, read from one of its agents.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/config", security(("bearer" = [])),
    params(("cluster" = String, Path)),
    responses((status = 200, body = ClusterConfig), (status = 404, body = ProblemDoc), (status = 503, body = ProblemDoc)))]
async fn get_config(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    match current_config(&app, &cluster).await {
        Ok(c) => Json(c).into_response(),
        Err(r) => r,
    }
}

/// Changes the dynamic configuration: checked here against the current one (422 naming the
/// field), then sent as a `config` command to the agents' vote. Recorded in the history.
#[utoipa::path(patch, path = "/api/v1/clusters/{cluster}/config", security(("bearer" = [])),
    params(("cluster" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body(content = Object, description = "a configuration patch: parameters (null removes), pg_hba, ttl, synchronous_mode, …"),
    responses((status = 202, body = CommandRow), (status = 200, description = "the command already made with this Idempotency-Key", body = CommandRow),
        (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc), (status = 409, body = ProblemDoc), (status = 422, body = ProblemDoc), (status = 503, body = ProblemDoc)))]
async fn patch_config(
    Authed(a): Operator,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    ApiJson(patch): ApiJson<serde_json::Value>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    let parsed: pgwarden_core::dynconfig::ConfigPatch = match serde_json::from_value(patch.clone())
    {
        Ok(p) => p,
        Err(e) => {
            let text = e.to_string();
            let f = field_of(&text).unwrap_or_else(|| "body".into());
            return unprocessable(&f, text);
        }
    };
    let current = match current_config(&app, &cluster).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Ok(cur) =
        serde_json::from_value::<pgwarden_core::dynconfig::DynamicConfig>(current.config.clone())
    {
        if let Err(e) = pgwarden_core::dynconfig::apply_patch(&cur, &parsed) {
            return unprocessable(&e.field, e.message);
        }
    }
    let resp = queue_command(
        &app,
        &a.user,
        &cluster,
        CommandKind::Config,
        None,
        &patch,
        None,
        idem_key(&headers, None),
    )
    .await;
    if resp.status() == StatusCode::ACCEPTED {
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        if let Ok(row) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let id = row.get("id").and_then(|v| v.as_str()).unwrap_or_default();
            if let Err(e) = app
                .store
                .add_config_change(&cluster, &a.user, &patch, Some(&current.config), id)
                .await
            {
                return internal(e);
            }
        }
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    resp
}

/// Configuration changes made through the server, newest first.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/config/history", security(("bearer" = [])),
    params(("cluster" = String, Path)),
    responses((status = 200, body = [ConfigChange]), (status = 404, body = ProblemDoc)))]
async fn config_history(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    match app.store.config_history(&cluster).await {
        Ok(h) => Json(h).into_response(),
        Err(e) => internal(e),
    }
}

/// Replication lag samples (bytes), for the last hour by default.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/lag", security(("bearer" = [])),
    params(("cluster" = String, Path), ("node" = Option<String>, Query), ("since" = Option<String>, Query)),
    responses((status = 200, body = [LagSample]), (status = 400, body = ProblemDoc), (status = 404, body = ProblemDoc)))]
async fn lag_history(
    _v: Viewer,
    State(app): State<Shared>,
    Path(cluster): Path<String>,
    req: Request,
) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    let q = QueryMap::from_uri(req.uri().query());
    if let Err(r) = q.only(&["node", "since"]) {
        return r;
    }
    let since = match q.time("since") {
        Ok(s) => s.unwrap_or(now_ms() - 3_600_000),
        Err(r) => return r,
    };
    match app
        .store
        .lag_samples(&cluster, q.str("node").as_deref(), since)
        .await
    {
        Ok(s) => Json(s).into_response(),
        Err(e) => internal(e),
    }
}

/// The failover records (every change of lease holder, with its steps and candidates).
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/failovers", security(("bearer" = [])),
    params(("cluster" = String, Path)),
    responses((status = 200, description = "records, oldest first", body = [Object]), (status = 404, body = ProblemDoc)))]
async fn failovers(_v: Viewer, State(app): State<Shared>, Path(cluster): Path<String>) -> Response {
    if let Err(r) = require_cluster(&app, &cluster).await {
        return r;
    }
    match app.store.failover_records(&cluster).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

// ---- API tokens ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Admins may create a token for another user.
    pub user: Option<String>,
    /// Lifetime (`30d`); no expiry when absent.
    #[schema(pattern = "^[0-9]+(ms|s|m|min|h|d)?$")]
    pub ttl: Option<String>,
}

/// API tokens: your own, or everyone's for an admin.
#[utoipa::path(get, path = "/api/v1/tokens", security(("bearer" = [])),
    responses((status = 200, body = [ApiTokenRow]), (status = 401, body = ProblemDoc)))]
async fn list_tokens(Authed(a): Viewer, State(app): State<Shared>) -> Response {
    let user = (a.role != Role::Admin).then_some(a.user.as_str());
    match app.store.api_tokens(user).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => internal(e),
    }
}

/// Creates an API token; the token is in the answer only.
#[utoipa::path(post, path = "/api/v1/tokens", security(("bearer" = [])), request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn create_token(
    Authed(a): Viewer,
    State(app): State<Shared>,
    ApiJson(c): ApiJson<CreateToken>,
) -> Response {
    if c.name.trim().is_empty() || c.name.len() > 100 {
        return unprocessable("name", "must be 1 to 100 characters");
    }
    let user = c.user.clone().unwrap_or(a.user.clone());
    if user != a.user {
        if a.role != Role::Admin {
            return problem(Problem::new(
                403,
                "Forbidden",
                "only an admin creates tokens for other users",
            ));
        }
        match app.store.user(&user).await {
            Ok(Some(_)) => {}
            Ok(None) => return unprocessable("user", format!("no user {user:?}")),
            Err(e) => return internal(e),
        }
    }
    let expires = match parse_ttl("ttl", c.ttl.as_deref(), None) {
        Ok(e) => e,
        Err(r) => return r,
    };
    issue_token(&app, &user, &c.name, expires).await
}

/// Deletes an API token (your own; any for an admin).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ProblemDoc)))]
async fn delete_token(
    Authed(a): Viewer,
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    let user = (a.role != Role::Admin).then_some(a.user.as_str());
    match app.store.delete_api_token(&id, user).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(format!("no token {id:?}")),
        Err(e) => internal(e),
    }
}

// ---- join tokens ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub cluster: String,
    /// Lifetime (`1h` by default).
    #[schema(pattern = "^[0-9]+(ms|s|m|min|h|d)?$")]
    pub ttl: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JoinTokenCreated {
    pub id: String,
    /// For `pgwarden-agent join --token`: shown once, usable once.
    pub token: String,
    pub cluster: String,
    pub expires_ms: i64,
    /// For `pgwarden-agent join --ca-fingerprint`.
    pub ca_fingerprint: String,
}

/// Join tokens (without the tokens themselves).
#[utoipa::path(get, path = "/api/v1/join-tokens", security(("bearer" = [])),
    responses((status = 200, body = [JoinTokenRow]), (status = 403, body = ProblemDoc)))]
async fn list_join_tokens(_a: Admin, State(app): State<Shared>) -> Response {
    match app.store.join_tokens().await {
        Ok(t) => Json(t).into_response(),
        Err(e) => internal(e),
    }
}

/// Creates a one-time join token for enrolling an agent of `cluster`.
#[utoipa::path(post, path = "/api/v1/join-tokens", security(("bearer" = [])), request_body = CreateJoinToken,
    responses((status = 201, body = JoinTokenCreated), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn create_join_token(
    Authed(a): Admin,
    State(app): State<Shared>,
    ApiJson(c): ApiJson<CreateJoinToken>,
) -> Response {
    if let Err(r) = check_cluster_name(&c.cluster) {
        return r;
    }
    let default = app.cfg.agents.join_token_ttl.0.as_millis() as i64;
    let expires = match parse_ttl("ttl", c.ttl.as_deref(), Some(default)) {
        Ok(e) => e.unwrap_or(now_ms() + default),
        Err(r) => return r,
    };
    let (token, id) = match (auth::new_join_token(), auth::random_hex(8)) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return internal(e),
    };
    if let Err(e) = app.store.create_cluster(&c.cluster).await {
        return internal(e);
    }
    if let Err(e) = app
        .store
        .create_join_token(&id, &c.cluster, &auth::token_hash(&token), &a.user, expires)
        .await
    {
        return internal(e);
    }
    let fp = pgwarden_pki::certs::fingerprint(app.ca.pem()).unwrap_or_default();
    (
        StatusCode::CREATED,
        Json(JoinTokenCreated {
            id,
            token,
            cluster: c.cluster,
            expires_ms: expires,
            ca_fingerprint: fp,
        }),
    )
        .into_response()
}

/// Deletes a join token.
#[utoipa::path(delete, path = "/api/v1/join-tokens/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ProblemDoc)))]
async fn delete_join_token(
    _a: Admin,
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Response {
    match app.store.delete_join_token(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(format!("no join token {id:?}")),
        Err(e) => internal(e),
    }
}

// ---- users ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    #[schema(pattern = "^(viewer|operator|admin)$")]
    pub role: String,
    /// At least 12 characters; without one the user can only use API tokens.
    #[schema(min_length = 12)]
    pub password: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[schema(pattern = "^(viewer|operator|admin)$")]
    pub role: Option<String>,
    #[schema(min_length = 12)]
    pub password: Option<String>,
    pub disabled: Option<bool>,
}

fn check_role(field: &str, r: &str) -> Result<Role, Response> {
    Role::parse(r)
        .ok_or_else(|| unprocessable(field, format!("{r:?} is not viewer, operator or admin")))
}

fn check_password(p: &str) -> Result<String, Response> {
    if p.chars().count() < 12 {
        return Err(unprocessable("password", "must be at least 12 characters"));
    }
    auth::hash_password(p).map_err(internal)
}

/// Users and their roles.
#[utoipa::path(get, path = "/api/v1/users", security(("bearer" = [])),
    responses((status = 200, body = [UserRow]), (status = 403, body = ProblemDoc)))]
async fn list_users(_a: Admin, State(app): State<Shared>) -> Response {
    match app.store.users().await {
        Ok(u) => Json(u).into_response(),
        Err(e) => internal(e),
    }
}

/// Creates a user.
#[utoipa::path(post, path = "/api/v1/users", security(("bearer" = [])), request_body = CreateUser,
    responses((status = 201, body = UserRow), (status = 403, body = ProblemDoc), (status = 409, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn create_user(
    _a: Admin,
    State(app): State<Shared>,
    ApiJson(c): ApiJson<CreateUser>,
) -> Response {
    if !auth::valid_name(&c.name) {
        return unprocessable("name", "1 to 64 of letters, digits, . _ - @");
    }
    if let Err(r) = check_role("role", &c.role) {
        return r;
    }
    let hash = match c.password.as_deref().map(check_password).transpose() {
        Ok(h) => h,
        Err(r) => return r,
    };
    match app
        .store
        .create_user(&c.name, &c.role, hash.as_deref())
        .await
    {
        Ok(true) => match app.store.user(&c.name).await {
            Ok(Some((u, _))) => (StatusCode::CREATED, Json(u)).into_response(),
            Ok(None) => not_found("the user vanished"),
            Err(e) => internal(e),
        },
        Ok(false) => conflict("name", format!("a user {:?} exists", c.name)),
        Err(e) => internal(e),
    }
}

/// Changes a user's role, password or disabled flag.
#[utoipa::path(patch, path = "/api/v1/users/{name}", security(("bearer" = [])), params(("name" = String, Path)),
    request_body = UpdateUser,
    responses((status = 200, body = UserRow), (status = 403, body = ProblemDoc), (status = 404, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn update_user(
    Authed(a): Admin,
    State(app): State<Shared>,
    Path(name): Path<String>,
    ApiJson(u): ApiJson<UpdateUser>,
) -> Response {
    if let Some(r) = &u.role {
        if let Err(resp) = check_role("role", r) {
            return resp;
        }
        if name == a.user && r != "admin" {
            return unprocessable("role", "an admin cannot lower their own role");
        }
    }
    let hash = match u.password.as_deref().map(check_password).transpose() {
        Ok(h) => h,
        Err(r) => return r,
    };
    match app
        .store
        .update_user(&name, u.role.as_deref(), hash.as_deref(), u.disabled)
        .await
    {
        Ok(_) => match app.store.user(&name).await {
            Ok(Some((row, _))) => Json(row).into_response(),
            Ok(None) => not_found(format!("no user {name:?}")),
            Err(e) => internal(e),
        },
        Err(e) => internal(e),
    }
}

/// Deletes a user and their tokens.
#[utoipa::path(delete, path = "/api/v1/users/{name}", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn delete_user(
    Authed(a): Admin,
    State(app): State<Shared>,
    Path(name): Path<String>,
) -> Response {
    if name == a.user {
        return unprocessable("name", "an admin cannot delete themselves");
    }
    match app.store.delete_user(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(format!("no user {name:?}")),
        Err(e) => internal(e),
    }
}

// ---- certificates and audit ----

/// Certificates issued to agents.
#[utoipa::path(get, path = "/api/v1/certificates", security(("bearer" = [])),
    responses((status = 200, body = [CertificateRow]), (status = 403, body = ProblemDoc)))]
async fn list_certificates(_a: Admin, State(app): State<Shared>) -> Response {
    match app.store.certificates().await {
        Ok(c) => Json(c).into_response(),
        Err(e) => internal(e),
    }
}

/// Revokes a certificate: the server refuses it at once, agents once their next report tells
/// them.
#[utoipa::path(post, path = "/api/v1/certificates/{fingerprint}/revoke", security(("bearer" = [])),
    params(("fingerprint" = String, Path)),
    responses((status = 200, body = CertificateRow), (status = 404, body = ProblemDoc)))]
async fn revoke_certificate(
    Authed(a): Admin,
    State(app): State<Shared>,
    Path(fp): Path<String>,
) -> Response {
    if let Err(e) = app.store.revoke(Some(&fp), None, &a.user).await {
        return internal(e);
    }
    match app.store.certificate(&fp).await {
        Ok(Some(c)) => Json(c).into_response(),
        Ok(None) => not_found(format!("no certificate {fp:?}")),
        Err(e) => internal(e),
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditRow>,
    pub next_cursor: Option<String>,
}

/// The audit log of mutating calls, newest first.
#[utoipa::path(get, path = "/api/v1/audit", security(("bearer" = [])),
    params(("cursor" = Option<String>, Query), ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, body = AuditPage), (status = 400, body = ProblemDoc), (status = 403, body = ProblemDoc)))]
async fn audit_log(_a: Admin, State(app): State<Shared>, req: Request) -> Response {
    let q = QueryMap::from_uri(req.uri().query());
    if let Err(r) = q.only(&["cursor", "limit"]) {
        return r;
    }
    let (before, limit) = match (q.int("cursor", 1, i64::MAX), q.int("limit", 1, 500)) {
        (Ok(b), Ok(l)) => (b, l.unwrap_or(100)),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let mut items = match app.store.audit_log(before, limit + 1).await {
        Ok(i) => i,
        Err(e) => return internal(e),
    };
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(|a| a.seq.to_string())
    } else {
        None
    };
    Json(AuditPage { items, next_cursor }).into_response()
}

// ---- agents ----

/// The installation's CA certificate (PEM); agents check its fingerprint before trusting it.
#[utoipa::path(get, path = "/api/v1/enroll/ca", responses((status = 200, description = "PEM", content_type = "application/x-pem-file")))]
async fn enroll_ca(State(app): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        app.ca.pem().to_string(),
    )
        .into_response()
}

#[derive(Serialize, Deserialize, ToSchema)]
struct EnrollRequestDoc {
    token: String,
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    cluster: String,
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    node: String,
    csr_pem: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
struct EnrollResponseDoc {
    cluster: String,
    node: String,
    cert_pem: String,
    ca_pem: String,
    fingerprint: String,
}

async fn sign_for(
    app: &Shared,
    csr: &str,
    cluster: &str,
    node: &str,
) -> Result<EnrollResponse, Response> {
    let days = app.cfg.agents.certificate_days;
    let cert = app
        .ca
        .sign_csr(csr, cluster, node, days)
        .map_err(|e| unprocessable("csr_pem", format!("{e:#}")))?;
    let fp = pgwarden_pki::certs::fingerprint(&cert).map_err(internal)?;
    app.store.create_cluster(cluster).await.map_err(internal)?;
    app.store
        .add_certificate(&fp, cluster, node, now_ms() + i64::from(days) * 86_400_000)
        .await
        .map_err(internal)?;
    Ok(EnrollResponse {
        cluster: cluster.into(),
        node: node.into(),
        cert_pem: cert,
        ca_pem: app.ca.pem().into(),
        fingerprint: fp,
    })
}

/// Enrolls an agent: a one-time join token and a certificate request in, a certificate signed
/// by the CA out.
#[utoipa::path(post, path = "/api/v1/enroll", request_body = EnrollRequestDoc,
    responses((status = 201, body = EnrollResponseDoc), (status = 401, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn enroll(State(app): State<Shared>, ApiJson(r): ApiJson<EnrollRequest>) -> Response {
    if !auth::valid_name(&r.node) {
        return unprocessable("node", format!("{:?} is not a valid node name", r.node));
    }
    if let Err(resp) = check_cluster_name(&r.cluster) {
        return resp;
    }
    // Check the request before spending the token on it.
    if pgwarden_pki::certs::Ca::check_csr(&r.csr_pem).is_err() {
        return unprocessable("csr_pem", "not a PEM certificate request");
    }
    let cluster = match app
        .store
        .use_join_token(&auth::token_hash(&r.token), &r.node, now_ms())
        .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => return problem(Problem::new(401, "Unauthorized", why).field("token")),
        Err(e) => return internal(e),
    };
    if cluster != r.cluster {
        return problem(
            Problem::new(
                403,
                "Forbidden",
                format!(
                    "this join token is for cluster {cluster:?}, not {:?}",
                    r.cluster
                ),
            )
            .field("cluster"),
        );
    }
    match sign_for(&app, &r.csr_pem, &cluster, &r.node).await {
        Ok(resp) => {
            let _ = app
                .store
                .insert_event(
                    &format!("server-enrolled-{}", resp.fingerprint),
                    &cluster,
                    &r.node,
                    "agent_enrolled",
                    &format!("certificate {} issued", resp.fingerprint),
                )
                .await;
            app.events_changed.notify_waiters();
            (StatusCode::CREATED, Json(resp)).into_response()
        }
        Err(resp) => resp,
    }
}

/// An enrolled agent's new certificate (rotation), authenticated by its current one.
#[utoipa::path(post, path = "/api/v1/agent/renew", request_body(content = Object, description = "{\"csr_pem\": \"…\"}"),
    responses((status = 201, body = EnrollResponseDoc), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn agent_renew(
    agent: AgentIdentity,
    State(app): State<Shared>,
    ApiJson(r): ApiJson<RenewRequest>,
) -> Response {
    match sign_for(&app, &r.csr_pem, &agent.cluster, &agent.node).await {
        Ok(resp) => (StatusCode::CREATED, Json(resp)).into_response(),
        Err(resp) => resp,
    }
}

/// An agent's report: its status, its new events (stored once by id), its commands' states.
#[utoipa::path(post, path = "/api/v1/agent/report", request_body(content = Object, description = "AgentReport"),
    responses((status = 200, description = "ReportAck"), (status = 403, body = ProblemDoc), (status = 422, body = ProblemDoc)))]
async fn agent_report(
    agent: AgentIdentity,
    State(app): State<Shared>,
    ApiJson(r): ApiJson<AgentReport>,
) -> Response {
    if r.cluster != agent.cluster || r.node != agent.node {
        return problem(Problem::new(
            403,
            "Forbidden",
            format!(
                "this certificate is for {}/{}, the report is for {}/{}",
                agent.cluster, agent.node, r.cluster, r.node
            ),
        ));
    }
    let lag_interval = app.cfg.retention.lag_sample_interval.0.as_millis() as i64;
    let ing = match app.store.ingest_report(&r, now_ms(), lag_interval).await {
        Ok(i) => i,
        Err(e) => {
            if e.to_string().contains("not the reporting node") {
                return unprocessable("events", format!("{e:#}"));
            }
            return internal(e);
        }
    };
    Counters::inc(&app.counters.reports);
    app.counters
        .events_new
        .fetch_add(ing.events_new as u64, Ordering::Relaxed);
    if ing.events_new > 0 || ing.came_back {
        app.events_changed.notify_waiters();
    }
    if ing.deliveries_queued > 0 {
        app.webhooks_changed.notify_waiters();
    }
    if !r.commands.is_empty() {
        app.commands_changed.notify_waiters();
    }
    if ing.wants_history {
        let app2 = app.clone();
        let (cluster, url) = (r.cluster.clone(), r.api_url.clone());
        tokio::spawn(async move { crate::workers::fetch_history(&app2, &cluster, &url).await });
    }
    let revoked = match app.store.revoked_fingerprints().await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    Json(ReportAck {
        events_stored: ing.events_stored,
        revoked,
        report_interval_ms: app.cfg.agents.report_interval.0.as_millis() as u64,
    })
    .into_response()
}

// ---- health and metrics ----

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")))]
async fn healthz() -> Response {
    "ok\n".into_response()
}

/// The store answers.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, body = ProblemDoc)))]
async fn readyz(State(app): State<Shared>) -> Response {
    match app.store.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => problem(Problem::new(
            503,
            "Service Unavailable",
            format!("the store does not answer: {e:#}"),
        )),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(app): State<Shared>) -> Response {
    let c = &app.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    };
    counter(
        "pgwarden_server_reports_total",
        "Agent reports stored.",
        c.reports.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_events_stored_total",
        "New events stored.",
        c.events_new.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_commands_delivered_total",
        "Commands handed to an agent.",
        c.commands_delivered.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_command_delivery_failures_total",
        "Attempts to hand a command to an agent that failed.",
        c.delivery_failures.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_webhook_attempts_total",
        "Attempts to post a webhook delivery.",
        c.webhook_attempts.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_webhook_attempt_failures_total",
        "Webhook attempts without a 2xx answer.",
        c.webhook_attempt_failures.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_webhook_deliveries_failed_total",
        "Webhook deliveries given up at the maximum age.",
        c.webhook_deliveries_failed.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_api_client_errors_total",
        "API answers with a 4xx status.",
        c.api_4xx.load(Ordering::Relaxed),
    );
    counter(
        "pgwarden_server_api_server_errors_total",
        "API answers with a 5xx status.",
        c.api_5xx.load(Ordering::Relaxed),
    );
    if let Ok(nodes) = app.store.nodes(None).await {
        out.push_str("# HELP pgwarden_server_node_agent_up Whether the node's agent reports (1) or is down (0).\n# TYPE pgwarden_server_node_agent_up gauge\n");
        for n in &nodes {
            out.push_str(&format!(
                "pgwarden_server_node_agent_up{{cluster=\"{}\",node=\"{}\",role=\"{}\"}} {}\n",
                n.cluster,
                n.name,
                n.role,
                u8::from(n.agent_up)
            ));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
