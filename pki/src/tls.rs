//! HTTPS with the installation's CA, for the agent API and the server: the listener presents
//! its certificate and asks clients for theirs. A client certificate signed by the CA marks a
//! member of the installation (agents, the server); requests carry who presented it
//! (`PeerCert`), and the routes that need a member check it. Operators may connect without one
//! and authenticate with a bearer token. A revoked certificate (by fingerprint) is refused
//! after the handshake.

use crate::certs::{identity, Identity};
use anyhow::{anyhow, Context, Result};
use axum::Router;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use tower::ServiceExt;

/// The client certificate, signed by the installation's CA, when one was presented.
#[derive(Clone, Debug, Default)]
pub struct PeerCert(pub Option<Identity>);

impl PeerCert {
    pub fn verified(&self) -> bool {
        self.0.is_some()
    }
}

/// The TCP peer of the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Fingerprints of revoked certificates, shared with the code that learns them.
#[derive(Clone, Debug, Default)]
pub struct Revoked(Arc<RwLock<HashSet<String>>>);

impl Revoked {
    pub fn contains(&self, fingerprint: &str) -> bool {
        self.0.read().is_ok_and(|s| s.contains(fingerprint))
    }
    /// Replaces the set; returns whether it changed.
    pub fn replace(&self, new: HashSet<String>) -> bool {
        match self.0.write() {
            Ok(mut s) if *s != new => {
                *s = new;
                true
            }
            _ => false,
        }
    }
    pub fn snapshot(&self) -> HashSet<String> {
        self.0.read().map(|s| s.clone()).unwrap_or_default()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {path}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse certificates in {path}"))?;
    if v.is_empty() {
        return Err(anyhow!("{path} holds no certificate"));
    }
    Ok(v)
}

fn roots(ca_file: &str) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(ca_file)? {
        store
            .add(c)
            .with_context(|| format!("use {ca_file} as CA"))?;
    }
    Ok(store)
}

/// The TLS acceptor: presents `cert_file`/`key_file`, accepts clients with or without a
/// certificate signed by `ca_file`.
pub fn acceptor(
    ca_file: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<tokio_rustls::TlsAcceptor> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_file)?), provider())
            .allow_unauthenticated()
            .build()
            .context("build the client-certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("read the private key {key_file}"))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_file)?, key)
        .context("load the node certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// An HTTPS client that trusts the installation's CA and presents this node's certificate
/// (`cert_key`: the certificate and key files), or none.
pub fn client(
    ca_file: &str,
    cert_key: Option<(&str, &str)>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client> {
    let ca = std::fs::read(ca_file).with_context(|| format!("read {ca_file}"))?;
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).context("parse the CA")?);
    if let Some((cert_file, key_file)) = cert_key {
        let mut ident = std::fs::read(cert_file).with_context(|| format!("read {cert_file}"))?;
        ident.extend(std::fs::read(key_file).with_context(|| format!("read {key_file}"))?);
        b = b.identity(
            reqwest::Identity::from_pem(&ident).context("parse the certificate and key")?,
        );
    }
    b.timeout(timeout)
        .connect_timeout(std::time::Duration::from_millis(500))
        .build()
        .context("build the HTTPS client")
}

/// Serves `router` over TLS on `listener` until the process ends. Connections presenting a
/// revoked certificate are closed after the handshake.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    revoked: Revoked,
) -> Result<()> {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let revoked = revoked.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| identity(c.as_ref()).ok());
            if let Some(id) = &peer {
                if revoked.contains(&id.fingerprint) {
                    tracing::info!(peer = %addr, cn = %id.cn, "refused a revoked certificate");
                    return;
                }
            }
            let peer = PeerCert(peer);
            let svc =
                router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req.extensions_mut().insert(PeerAddr(addr));
                    req
                });
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(peer = %addr, error = %e, "connection");
            }
        });
    }
}
