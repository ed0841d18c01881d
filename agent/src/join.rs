//! Enrollment with the control plane (`pgwarden-agent join`): fetch the installation's CA from
//! `pgwarden-server`, check it against the fingerprint the operator was given, send a
//! certificate request with the one-time join token, and keep the signed certificate in the
//! state directory. The private key is made here and never leaves the node.
//!
//! Also the layout of what `join` writes, which the agent reads at every start:
//! `<state_dir>/tls/{ca.pem,node.pem,node.key}` (used when the configuration has no `[tls]`)
//! and `<state_dir>/server.json` (used when it has no `[server]`).

use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::config::{check_server_url, AgentConfig, TlsSection};
use pgwarden_core::control::{EnrollRequest, EnrollResponse};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `<state_dir>/tls`: the enrolled certificate, its key, the CA and the revoked fingerprints.
pub fn tls_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// `<state_dir>/server.json`: where the control plane is, as `join` was told.
pub fn server_file(state_dir: &Path) -> PathBuf {
    state_dir.join("server.json")
}

/// The certificate `join` stored, as a `[tls]` section, when all three files exist.
pub fn tls_from_state_dir(state_dir: &Path) -> Option<TlsSection> {
    let dir = tls_dir(state_dir);
    let [ca, cert, key] = ["ca.pem", "node.pem", "node.key"].map(|f| dir.join(f));
    if !(ca.is_file() && cert.is_file() && key.is_file()) {
        return None;
    }
    Some(TlsSection {
        ca_file: ca.display().to_string(),
        cert_file: cert.display().to_string(),
        key_file: key.display().to_string(),
    })
}

/// The contents of `<state_dir>/server.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFile {
    /// `https://host:port` of `pgwarden-server`.
    pub url: String,
    /// The CA's SHA-256 fingerprint the operator confirmed at `join`.
    pub ca_fingerprint: String,
}

/// Reads `<state_dir>/server.json`; `None` when it does not exist.
pub fn read_server_file(state_dir: &Path) -> Result<Option<ServerFile>> {
    let path = server_file(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let f: ServerFile =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    check_server_url(&f.url).map_err(|m| anyhow!("{}: url: {m}", path.display()))?;
    Ok(Some(f))
}

/// A SHA-256 fingerprint in the form `AB:CD:…` (upper case, colons), from any case with or
/// without colons; `None` when it is not 32 bytes of hexadecimal.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let pairs: Vec<&str> = (0..32).map(|i| &hex[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// Whether two fingerprints are the same, whatever their case and colons.
pub fn same_fingerprint(a: &str, b: &str) -> bool {
    match (normalize_fingerprint(a), normalize_fingerprint(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// What `join` was asked to do.
#[derive(Clone, Debug)]
pub struct JoinArgs {
    /// `https://host:port` of `pgwarden-server`.
    pub server: String,
    /// The one-time join token.
    pub token: String,
    /// The CA's SHA-256 fingerprint as the operator got it (`pgwarden-server init` prints it).
    pub ca_fingerprint: String,
    /// Replace an existing enrolled certificate.
    pub force: bool,
}

/// What `join` wrote.
#[derive(Clone, Debug)]
pub struct Joined {
    /// SHA-256 of the new node certificate (the id the server revokes it by).
    pub fingerprint: String,
    pub tls: TlsSection,
    pub server_file: PathBuf,
}

/// Removes a file when dropped (the CA written only for the enrollment call).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The message of an error answer: the problem document's `detail` (or `title`), else the
/// body's text.
pub fn problem_detail(body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let field = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|d| d.as_str())
            .filter(|d| !d.is_empty())
            .map(String::from)
    };
    field("detail")
        .or_else(|| field("title"))
        .unwrap_or_else(|| body.trim().chars().take(500).collect())
}

/// Enrolls this node with the control plane at `args.server`. Nothing is written unless the
/// server's CA matches `args.ca_fingerprint` and the server signed the request.
pub async fn join(cfg: &AgentConfig, args: &JoinArgs) -> Result<Joined> {
    let url = args.server.trim_end_matches('/').to_string();
    check_server_url(&url).map_err(|m| anyhow!("--server: {m}"))?;
    let expected = normalize_fingerprint(&args.ca_fingerprint).ok_or_else(|| {
        anyhow!(
            "--ca-fingerprint: {:?} is not a SHA-256 fingerprint (64 hexadecimal digits, colons optional)",
            args.ca_fingerprint
        )
    })?;
    if args.token.trim().is_empty() {
        bail!("--token: the join token is empty");
    }
    let state_dir = PathBuf::from(&cfg.node.state_dir);
    let dir = tls_dir(&state_dir);
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    );
    if cert_path.exists() && !args.force {
        bail!(
            "{} exists: this node is already enrolled (use --force to enroll again and replace it)",
            cert_path.display()
        );
    }
    let node = cfg.node.name.clone();
    let cluster = cfg.cluster.name.clone();
    let host = cfg.me().host.clone();

    // The CA, over a connection that cannot be verified yet: the fingerprint check is what
    // makes it trusted.
    let insecure = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("build the HTTPS client")?;
    let ca_url = format!("{url}/api/v1/enroll/ca");
    let r = insecure
        .get(&ca_url)
        .send()
        .await
        .with_context(|| format!("GET {ca_url}"))?;
    let code = r.status();
    let body = r
        .text()
        .await
        .with_context(|| format!("read the answer of {ca_url}"))?;
    if !code.is_success() {
        bail!("GET {ca_url} answered {code}: {}", problem_detail(&body));
    }
    let ca_pem = body;
    let got = pgwarden_pki::certs::fingerprint(&ca_pem)
        .with_context(|| format!("{ca_url} did not answer a PEM certificate"))?;
    if !same_fingerprint(&got, &expected) {
        bail!(
            "the server's CA has the fingerprint {got}, not {expected} as given with --ca-fingerprint: \
             refusing to enroll (wrong server, or a connection that is being intercepted); nothing was written"
        );
    }

    let (key_pem, csr_pem) = pgwarden_pki::certs::new_request(&node, std::slice::from_ref(&host))
        .context("make the certificate request")?;
    create_private_dir(&dir)?;
    let tmp_ca = TempFile(dir.join(format!(".ca.pem.join-{}", std::process::id())));
    std::fs::write(&tmp_ca.0, &ca_pem).with_context(|| format!("write {}", tmp_ca.0.display()))?;
    let client = pgwarden_pki::tls::client(
        &tmp_ca.0.display().to_string(),
        None,
        Duration::from_secs(30),
    )?;
    let enroll_url = format!("{url}/api/v1/enroll");
    let r = client
        .post(&enroll_url)
        .json(&EnrollRequest {
            token: args.token.trim().to_string(),
            cluster: cluster.clone(),
            node: node.clone(),
            csr_pem,
        })
        .send()
        .await
        .with_context(|| {
            format!("POST {enroll_url} (the server's certificate must be signed by the CA and name the host of --server)")
        })?;
    let code = r.status();
    let body = r
        .text()
        .await
        .with_context(|| format!("read the answer of {enroll_url}"))?;
    if !code.is_success() {
        bail!(
            "the server refused the enrollment ({code}): {}",
            problem_detail(&body)
        );
    }
    let resp: EnrollResponse = serde_json::from_str(&body)
        .with_context(|| format!("{enroll_url}: not an enrollment response"))?;
    if resp.node != node || resp.cluster != cluster {
        bail!(
            "the server enrolled node {:?} of cluster {:?}, not {node:?} of {cluster:?}",
            resp.node,
            resp.cluster
        );
    }
    let resp_ca = pgwarden_pki::certs::fingerprint(&resp.ca_pem)
        .context("the enrollment response's CA is not a PEM certificate")?;
    if !same_fingerprint(&resp_ca, &expected) {
        bail!("the enrollment response names another CA ({resp_ca}, expected {expected})");
    }
    let fingerprint = pgwarden_pki::certs::fingerprint(&resp.cert_pem)
        .context("the enrollment response's certificate is not a PEM certificate")?;

    pgwarden_pki::certs::write_private(&key_path, &key_pem)?;
    crate::sys::write_durable(&cert_path, resp.cert_pem.as_bytes(), 0o644)?;
    crate::sys::write_durable(&ca_path, ca_pem.as_bytes(), 0o644)?;
    let server_path = server_file(&state_dir);
    let text = serde_json::to_string_pretty(&ServerFile {
        url,
        ca_fingerprint: expected,
    })
    .context("encode server.json")?;
    crate::sys::write_durable(&server_path, format!("{text}\n").as_bytes(), 0o644)?;
    Ok(Joined {
        fingerprint,
        tls: TlsSection {
            ca_file: ca_path.display().to_string(),
            cert_file: cert_path.display().to_string(),
            key_file: key_path.display().to_string(),
        },
        server_file: server_path,
    })
}

/// Rotates this node's certificate: a new key and request, authenticated by the current
/// certificate (`POST /api/v1/agent/renew` on the server enrolled with). The current files are
/// kept as `node.pem.old` and `node.key.old`. Returns the new certificate's fingerprint; the
/// agent uses it from its next start.
pub async fn renew(cfg: &AgentConfig) -> Result<String> {
    let state_dir = PathBuf::from(&cfg.node.state_dir);
    let server = read_server_file(&state_dir)?.ok_or_else(|| {
        anyhow!(
            "this node was not enrolled ({} is missing): run join first",
            server_file(&state_dir).display()
        )
    })?;
    let dir = tls_dir(&state_dir);
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    );
    let s = |p: &Path| p.display().to_string();
    let client = pgwarden_pki::tls::client(
        &s(&ca_path),
        Some((&s(&cert_path), &s(&key_path))),
        Duration::from_secs(30),
    )?;
    let (key_pem, csr_pem) =
        pgwarden_pki::certs::new_request(&cfg.node.name, std::slice::from_ref(&cfg.me().host))
            .context("make the certificate request")?;
    let url = format!("{}/api/v1/agent/renew", server.url.trim_end_matches('/'));
    let r = client
        .post(&url)
        .json(&pgwarden_core::control::RenewRequest { csr_pem })
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let code = r.status();
    let body = r
        .text()
        .await
        .with_context(|| format!("read the answer of {url}"))?;
    if !code.is_success() {
        bail!(
            "the server refused the renewal ({code}): {}",
            problem_detail(&body)
        );
    }
    let resp: EnrollResponse = serde_json::from_str(&body)
        .with_context(|| format!("{url}: not an enrollment response"))?;
    if resp.node != cfg.node.name || resp.cluster != cfg.cluster.name {
        bail!(
            "the server renewed {:?}/{:?}, not this node",
            resp.cluster,
            resp.node
        );
    }
    let ca = pgwarden_pki::certs::fingerprint(&resp.ca_pem).context("the response's CA")?;
    if !same_fingerprint(&ca, &server.ca_fingerprint) {
        bail!("the renewal names another CA ({ca})");
    }
    let fingerprint =
        pgwarden_pki::certs::fingerprint(&resp.cert_pem).context("the new certificate")?;
    std::fs::copy(&cert_path, dir.join("node.pem.old")).context("keep node.pem")?;
    let old_key = std::fs::read_to_string(&key_path).context("read node.key")?;
    pgwarden_pki::certs::write_private(&dir.join("node.key.old"), &old_key)?;
    pgwarden_pki::certs::write_private(&key_path, &key_pem)?;
    crate::sys::write_durable(&cert_path, resp.cert_pem.as_bytes(), 0o644)?;
    Ok(fingerprint)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn fingerprints_compare_whatever_the_case_and_colons() {
        assert_eq!(normalize_fingerprint(FP).as_deref(), Some(FP));
        let bare = FP.replace(':', "").to_lowercase();
        assert_eq!(normalize_fingerprint(&bare).as_deref(), Some(FP));
        assert_eq!(
            normalize_fingerprint(&format!("  {}\n", FP.to_lowercase())).as_deref(),
            Some(FP)
        );
        assert!(same_fingerprint(FP, &bare));
        assert!(!same_fingerprint(
            FP,
            &FP.replace("AB:CD:EF:01", "AB:CD:EF:02")
        ));
        assert_eq!(normalize_fingerprint(&FP[..FP.len() - 3]), None);
        assert_eq!(normalize_fingerprint(&FP.replace('A', "G")), None);
        assert_eq!(normalize_fingerprint(""), None);
        assert!(!same_fingerprint("", ""));
    }

    #[test]
    fn problem_details_are_preferred_over_the_body() {
        let p = r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"the join token was already used"}"#;
        assert_eq!(problem_detail(p), "the join token was already used");
        assert_eq!(
            problem_detail(r#"{"title":"Forbidden","status":403}"#),
            "Forbidden"
        );
        assert_eq!(problem_detail("bad gateway\n"), "bad gateway");
    }

    #[test]
    fn enrolled_files_are_found_only_when_complete() {
        let dir = std::env::temp_dir().join(format!("pgwarden-join-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(tls_from_state_dir(&dir), None);
        assert_eq!(read_server_file(&dir).unwrap(), None);
        std::fs::create_dir_all(tls_dir(&dir)).unwrap();
        for f in ["ca.pem", "node.pem"] {
            std::fs::write(tls_dir(&dir).join(f), "x").unwrap();
        }
        assert_eq!(tls_from_state_dir(&dir), None);
        std::fs::write(tls_dir(&dir).join("node.key"), "x").unwrap();
        let t = tls_from_state_dir(&dir).unwrap();
        assert!(t.ca_file.ends_with("/tls/ca.pem"), "{t:?}");
        assert!(t.cert_file.ends_with("/tls/node.pem"), "{t:?}");
        assert!(t.key_file.ends_with("/tls/node.key"), "{t:?}");
        std::fs::write(
            server_file(&dir),
            format!(r#"{{"url": "https://cp:9443", "ca_fingerprint": "{FP}"}}"#),
        )
        .unwrap();
        let f = read_server_file(&dir).unwrap().unwrap();
        assert_eq!(f.url, "https://cp:9443");
        std::fs::write(
            server_file(&dir),
            r#"{"url": "http://cp", "ca_fingerprint": ""}"#,
        )
        .unwrap();
        assert!(read_server_file(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
