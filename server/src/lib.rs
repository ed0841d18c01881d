//! pgwarden-server: the control plane. It stores clusters, nodes, events and commands in
//! SQLite or PostgreSQL (`store`), enrolls agents and authenticates them by certificate,
//! serves the REST API (`api`), delivers commands to agents (`workers`), and posts events to
//! webhooks (`webhooks` decides, `delivery` posts).

// Handlers return `Result<_, Response>` so an error is already the problem document to send;
// the size of `Response` does not matter on these paths.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod app;
pub mod auth;
pub mod delivery;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod webhooks;
pub mod workers;

use anyhow::{Context, Result};
use app::{App, Counters, Shared};
use pgwarden_core::server_config::ServerConfig;
use pgwarden_pki::certs::Ca;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use store::Store;
use tokio::sync::Notify;

/// What `pgwarden-server init` made, for the operator (printed once).
#[derive(Debug, serde::Serialize)]
pub struct InitOutput {
    pub ca_fingerprint: String,
    pub ca_file: String,
    /// Set when this run created the first user.
    pub admin_user: Option<String>,
    pub admin_password: Option<String>,
    pub admin_token: Option<String>,
}

/// Creates what a new installation needs, keeping whatever exists: the CA, the server
/// certificate, the store's schema, and a first admin user with a password and an API token.
pub async fn init(cfg: &ServerConfig) -> Result<InitOutput> {
    let ca_file = cfg.ca_file();
    let ca_dir = Path::new(&ca_file)
        .parent()
        .context("the CA file has no directory")?
        .to_path_buf();
    if !Path::new(&ca_file).exists() {
        pgwarden_pki::certs::init(&ca_dir)?;
    }
    if !Path::new(&cfg.cert_file()).exists() {
        let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
            if !h.trim().is_empty() {
                hosts.push(h.trim().to_string());
            }
        }
        hosts.extend(cfg.tls.hosts.iter().cloned());
        if let Ok(a) = cfg.listen.parse::<SocketAddr>() {
            if !a.ip().is_unspecified() {
                hosts.push(a.ip().to_string());
            }
        }
        hosts.sort();
        hosts.dedup();
        let out = Path::new(&cfg.cert_file())
            .parent()
            .context("the certificate file has no directory")?
            .to_path_buf();
        let cn = pgwarden_pki::certs::CONTROL_PLANE_CN;
        pgwarden_pki::certs::issue(&ca_dir, cn, &hosts, &out)?;
        let (made_pem, made_key) = (out.join(format!("{cn}.pem")), out.join(format!("{cn}.key")));
        if made_pem != Path::new(&cfg.cert_file()) {
            std::fs::rename(&made_pem, cfg.cert_file())?;
            std::fs::rename(&made_key, cfg.key_file())?;
        }
    }
    let store = Store::open(&cfg.database_url()).await?;
    let pem = std::fs::read_to_string(&ca_file).with_context(|| format!("read {ca_file}"))?;
    let mut out = InitOutput {
        ca_fingerprint: pgwarden_pki::certs::fingerprint(&pem)?,
        ca_file: ca_file.clone(),
        admin_user: None,
        admin_password: None,
        admin_token: None,
    };
    if store.user_count().await? == 0 {
        let password = auth::random_hex(12)?;
        let token = auth::new_api_token()?;
        store
            .create_user("admin", "admin", Some(&auth::hash_password(&password)?))
            .await?;
        store
            .create_api_token(
                &auth::random_hex(8)?,
                "admin",
                "created by init",
                &auth::token_hash(&token),
                None,
            )
            .await?;
        out.admin_user = Some("admin".into());
        out.admin_password = Some(password);
        out.admin_token = Some(token);
    }
    Ok(out)
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Shared,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

fn default_server_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!(
        "{}-{}",
        if host.is_empty() { "server" } else { &host },
        std::process::id()
    )
}

/// Opens the store, loads the PKI, starts the background work and serves HTTPS on
/// `cfg.listen`.
pub async fn start(cfg: ServerConfig) -> Result<Running> {
    for (what, f) in [
        ("the CA certificate", cfg.ca_file()),
        ("the CA key", cfg.ca_key_file()),
        ("the server certificate", cfg.cert_file()),
        ("the server key", cfg.key_file()),
    ] {
        if !Path::new(&f).exists() {
            anyhow::bail!("{what} {f} does not exist: run `pgwarden-server init --config …` first");
        }
    }
    let store = Store::open(&cfg.database_url()).await?;
    let ca = Ca::load_files(Path::new(&cfg.ca_file()), Path::new(&cfg.ca_key_file()))?;
    let agents = pgwarden_pki::tls::client(
        &cfg.ca_file(),
        Some((&cfg.cert_file(), &cfg.key_file())),
        std::time::Duration::from_secs(10),
    )?;
    let webhooks = delivery::client(&cfg)?;
    let acceptor = pgwarden_pki::tls::acceptor(&cfg.ca_file(), &cfg.cert_file(), &cfg.key_file())?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let app: Shared = Arc::new(App {
        store,
        server_id: cfg.server_id.clone().unwrap_or_else(default_server_id),
        cfg,
        ca,
        agents,
        events_changed: Notify::new(),
        commands_changed: Notify::new(),
        webhooks_changed: Notify::new(),
        webhooks,
        counters: Counters::default(),
    });
    workers::spawn(app.clone());
    let router = api::router(app.clone());
    let task = tokio::spawn(pgwarden_pki::tls::serve(
        listener,
        acceptor,
        router,
        pgwarden_pki::tls::Revoked::default(),
    ));
    tracing::info!(%addr, server_id = %app.server_id, backend = ?app.store.backend, "pgwarden-server listening");
    Ok(Running { addr, app, task })
}

/// A join token made directly in the store by `pgwarden-server join-token`.
#[derive(Debug, serde::Serialize)]
pub struct LocalJoinToken {
    pub cluster: String,
    pub token: String,
    pub expires_ms: i64,
    pub ca_fingerprint: String,
}

pub async fn local_join_token(
    cfg: &ServerConfig,
    cluster: &str,
    ttl: std::time::Duration,
) -> Result<LocalJoinToken> {
    if !auth::valid_name(cluster) {
        anyhow::bail!("--cluster {cluster:?}: 1 to 64 of letters, digits, . _ - @");
    }
    let store = Store::open(&cfg.database_url()).await?;
    let pem = std::fs::read_to_string(cfg.ca_file())
        .with_context(|| format!("read {} (run init first)", cfg.ca_file()))?;
    let token = auth::new_join_token()?;
    let expires_ms = store::now_ms() + ttl.as_millis() as i64;
    store.create_cluster(cluster).await?;
    store
        .create_join_token(
            &auth::random_hex(8)?,
            cluster,
            &auth::token_hash(&token),
            "local:pgwarden-server join-token",
            expires_ms,
        )
        .await?;
    Ok(LocalJoinToken {
        cluster: cluster.into(),
        token,
        expires_ms,
        ca_fingerprint: pgwarden_pki::certs::fingerprint(&pem)?,
    })
}
