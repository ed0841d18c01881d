//! HTTPS for the agent API with the installation's CA: the server presents the node's
//! certificate and asks clients for theirs. A client certificate signed by the CA marks a
//! member of the installation (agents, later the server); requests carry whether one was
//! presented (`PeerCert`), and the Raft routes require it. Operators may connect without one and
//! authenticate with the bearer token.

use anyhow::{anyhow, Context, Result};
use axum::Router;
use pgwarden_core::config::TlsSection;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tower::ServiceExt;

/// Whether the client presented a certificate signed by the installation's CA.
#[derive(Clone, Copy, Debug)]
pub struct PeerCert(pub bool);

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

/// The TLS acceptor for the agent API.
pub fn acceptor(t: &TlsSection) -> Result<tokio_rustls::TlsAcceptor> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&t.ca_file)?), provider())
            .allow_unauthenticated()
            .build()
            .context("build the client-certificate verifier")?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .with_context(|| format!("read the private key {}", t.key_file))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&t.cert_file)?, key)
        .context("load the node certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// An HTTPS client that trusts the installation's CA and presents this node's certificate.
pub fn client(t: &TlsSection, timeout: std::time::Duration) -> Result<reqwest::Client> {
    let ca = std::fs::read(&t.ca_file).with_context(|| format!("read {}", t.ca_file))?;
    let mut ident = std::fs::read(&t.cert_file).with_context(|| format!("read {}", t.cert_file))?;
    ident.extend(std::fs::read(&t.key_file).with_context(|| format!("read {}", t.key_file))?);
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).context("parse the CA")?)
        .identity(
            reqwest::Identity::from_pem(&ident).context("parse the node certificate and key")?,
        )
        .timeout(timeout)
        .connect_timeout(std::time::Duration::from_millis(500))
        .build()
        .context("build the HTTPS client")
}

/// Serves `router` over TLS on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
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
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let verified = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let svc =
                router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(PeerCert(verified));
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
