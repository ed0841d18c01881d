//! Test support (feature `testkit`): enrolls a stand-in agent through the API, the way
//! `pgwarden-agent join` does, so tests can report and act as an enrolled node.

use anyhow::{bail, Context, Result};
use pgwarden_core::control::{EnrollRequest, EnrollResponse};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An enrolled stand-in agent: its mutual-TLS client and files.
pub struct Enrolled {
    pub client: reqwest::Client,
    pub response: EnrollResponse,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Makes a join token with `admin_token`, enrolls `node` of `cluster` with a fresh key
/// (valid for 127.0.0.1), writes the certificate and key to `dir` under a name unique to this
/// certificate, and returns a client presenting them.
pub async fn enroll(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    ca_file: &Path,
    dir: &Path,
    cluster: &str,
    node: &str,
) -> Result<Enrolled> {
    let r = http
        .post(format!("{base}/api/v1/join-tokens"))
        .bearer_auth(admin_token)
        .json(&serde_json::json!({ "cluster": cluster }))
        .send()
        .await
        .context("POST /api/v1/join-tokens")?;
    let (status, body) = (r.status(), r.text().await?);
    if status.as_u16() != 201 {
        bail!("join token: {status} {body}");
    }
    let jt: serde_json::Value = serde_json::from_str(&body)?;
    let token = jt["token"].as_str().context("no token")?.to_string();
    let (key, csr_pem) = pgwarden_pki::certs::new_request(node, &["127.0.0.1".into()])?;
    let r = http
        .post(format!("{base}/api/v1/enroll"))
        .json(&EnrollRequest {
            token,
            cluster: cluster.into(),
            node: node.into(),
            csr_pem,
        })
        .send()
        .await
        .context("POST /api/v1/enroll")?;
    let (status, body) = (r.status(), r.text().await?);
    if status.as_u16() != 201 {
        bail!("enroll: {status} {body}");
    }
    let response: EnrollResponse = serde_json::from_str(&body)?;
    let stem = format!(
        "{cluster}-{node}-{}",
        response.fingerprint.replace(':', "").get(..8).unwrap_or("")
    );
    let (cert_file, key_file) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::create_dir_all(dir)?;
    std::fs::write(&cert_file, &response.cert_pem)?;
    pgwarden_pki::certs::write_private(&key_file, &key)?;
    let s = |p: &Path| p.display().to_string();
    let client = pgwarden_pki::tls::client(
        &s(ca_file),
        Some((&s(&cert_file), &s(&key_file))),
        Duration::from_secs(10),
    )?;
    Ok(Enrolled {
        client,
        response,
        cert_file,
        key_file,
    })
}
