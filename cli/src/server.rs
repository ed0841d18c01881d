//! The control plane's REST API (`pgwarden-server`, `/api/v1`) as the CLI uses it: requests
//! with the API token, problem documents turned into one-line errors naming the field, the
//! answers' shapes, and commands followed from `queued` to their outcome.

use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::control::CommandPhase;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a command's state is polled.
const POLL: Duration = Duration::from_millis(500);

/// What to do about a refused token.
pub const TOKEN_HINT: &str = "hint: pass an API token with --token or PGWARDEN_TOKEN, or run \
     `pgwardenctl login --server URL --user NAME` to store one";

/// An HTTP client: trusts `ca` only (when given), presents `cert`/`key` (when given).
/// `timeout` bounds a whole request; `read_timeout` each read (for streams).
pub fn http_client(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    timeout: Option<Duration>,
    read_timeout: Option<Duration>,
) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    if let Some(t) = read_timeout {
        b = b.read_timeout(t);
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("read the CA {}", ca.display()))?;
        b = b
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("parse the CA {}", ca.display()))?,
            );
    }
    if let Some((cert, key)) = identity {
        let mut ident =
            std::fs::read(cert).with_context(|| format!("read --cert {}", cert.display()))?;
        ident.extend(std::fs::read(key).with_context(|| format!("read --key {}", key.display()))?);
        b = b.identity(reqwest::Identity::from_pem(&ident).context("parse --cert/--key")?);
    }
    b.build().context("build the HTTP client")
}

/// Percent-encodes one path segment (a cluster, node, user or token id).
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The control plane, as given by `--server` / `PGWARDEN_SERVER` / the CLI configuration file.
pub struct Server {
    /// `https://host:port`, without a trailing slash.
    pub base: String,
    token: Option<String>,
    /// Where the token can be stored (`login`) and is looked for.
    pub config_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    http: reqwest::Client,
}

impl Server {
    pub fn new(
        url: &str,
        token: Option<String>,
        ca: Option<PathBuf>,
        identity: Option<(PathBuf, PathBuf)>,
        config_file: Option<PathBuf>,
    ) -> Result<Server> {
        let base = url.trim().trim_end_matches('/').to_string();
        let base = base
            .strip_suffix("/api/v1")
            .map(str::to_string)
            .unwrap_or(base);
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            bail!("--server: {url:?} is not a URL (https://HOST:PORT)");
        }
        if base.starts_with("https://") && ca.is_none() {
            bail!(
                "{base} is HTTPS: give the installation's CA certificate with --ca FILE (or \
                 PGWARDEN_CA, or `ca_file = \"…\"` in the CLI configuration file); \
                 pgwarden-server init prints where it is (<data_dir>/pki/ca.pem)"
            );
        }
        let ident = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let http = http_client(ca.as_deref(), ident, Some(Duration::from_secs(60)), None)?;
        Ok(Server {
            base,
            token,
            config_file,
            ca,
            identity,
            http,
        })
    }

    /// A client for long-lived streams: no overall timeout, but a read must come within a
    /// minute (the server sends a keep-alive every 15 s).
    pub fn stream_client(&self) -> Result<reqwest::Client> {
        let ident = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        http_client(
            self.ca.as_deref(),
            ident,
            None,
            Some(Duration::from_secs(60)),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn token(&self) -> Result<&str> {
        match &self.token {
            Some(t) => Ok(t),
            None => bail!(
                "an API token is required: --token or PGWARDEN_TOKEN, `token = \"…\"` in {}, \
                 or `pgwardenctl login --server URL --user NAME`",
                self.config_file
                    .as_ref()
                    .map_or("the CLI configuration file".into(), |f| f
                        .display()
                        .to_string())
            ),
        }
    }

    /// Sends one request; returns the status and the JSON answer (`null` when empty).
    /// Transport failures are errors; HTTP statuses are not.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        auth: bool,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value)> {
        let url = self.url(path);
        let mut req = self.http.request(method.clone(), &url);
        if auth {
            req = req.bearer_auth(self.token()?);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = r.status().as_u16();
        let text = r
            .text()
            .await
            .with_context(|| format!("read the answer to {method} {url}"))?;
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    /// A request whose answer must be a success; a problem document becomes
    /// `<detail> (field <field>)`.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let (status, v) = self.send(method, path, body, true, &[]).await?;
        check(status, v)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `GET path?query` whose answer must be a success.
    pub async fn get_query(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let url = self.url(path);
        let r = self
            .http
            .get(&url)
            .query(query)
            .bearer_auth(self.token()?)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        check(status, v)
    }
}

/// The answer if `status` is a success, else the problem document as an error.
pub fn check(status: u16, v: Value) -> Result<Value> {
    if (200..300).contains(&status) {
        return Ok(v);
    }
    Err(anyhow!("{}", problem_text(status, &v)))
}

/// An error answer in one line (plus a hint for a refused token).
pub fn problem_text(status: u16, v: &Value) -> String {
    let detail = v["detail"].as_str().filter(|d| !d.trim().is_empty());
    let mut out = match (detail, v) {
        (Some(d), _) => d.to_string(),
        // Not a problem document (a proxy's page, an empty answer): say what came.
        (None, Value::String(s)) => format!(
            "the server answered {status}: {}",
            s.trim().chars().take(500).collect::<String>()
        ),
        (None, Value::Null) => format!("the server answered {status}"),
        (None, other) => format!("the server answered {status}: {other}"),
    };
    if let Some(f) = v["field"].as_str() {
        out.push_str(&format!(" (field {f})"));
    }
    if status == 401 {
        out.push('\n');
        out.push_str(TOKEN_HINT);
    }
    out
}

/// A random `Idempotency-Key`, made once per invocation: retrying the request with it cannot
/// queue a second command.
pub fn idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if random.is_err() {
        // No /dev/urandom: the clock and the process id are unique enough for one invocation.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (now ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("pgwardenctl-{hex}")
}

// ---- the answers' shapes (the server's `store` rows) ----

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct NodeRow {
    pub cluster: String,
    pub name: String,
    pub api_url: String,
    pub agent_version: String,
    pub role: String,
    pub pg_state: String,
    pub timeline: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub last_report_ms: i64,
    pub agent_up: bool,
    pub status: Value,
}

impl NodeRow {
    /// The agent's status as reported, when it can be read.
    pub fn node_status(&self) -> Option<pgwarden_core::status::NodeStatus> {
        serde_json::from_value(self.status.clone()).ok()
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EventRow {
    pub seq: i64,
    pub id: String,
    pub ts_ms: i64,
    pub cluster: String,
    pub node: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ClusterDetail {
    pub name: String,
    pub primary: Option<String>,
    pub paused: bool,
    pub failover_ready: Option<bool>,
    pub last_event: Option<EventRow>,
    pub nodes: Vec<NodeRow>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommandRow {
    pub id: String,
    pub cluster: String,
    #[serde(default)]
    pub node: Option<String>,
    pub kind: String,
    pub state: CommandPhase,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub delivered_to: Option<String>,
    /// The agent API's answer once finished: `{"status": …, "body": …}`.
    #[serde(default)]
    pub result: Option<Value>,
}

impl CommandRow {
    /// The command's message; for an applied configuration change, the version it made (the
    /// agent answers a configuration change with the configuration, not a message).
    pub fn outcome(&self) -> String {
        let version = self
            .result
            .as_ref()
            .and_then(|r| r.pointer("/body/config/version"))
            .and_then(Value::as_u64);
        match (self.kind.as_str(), self.state, version) {
            ("config", CommandPhase::Succeeded, Some(v)) => {
                format!("configuration version {v} applied")
            }
            _ => self.message.clone(),
        }
    }
}

// ---- commands ----

/// Queues a command (`POST /api/v1/clusters/{c}/commands`) with a fresh idempotency key; a
/// request that failed in transit is sent again with the same key.
pub async fn create_command(server: &Server, cluster: &str, body: &Value) -> Result<Value> {
    let key = idempotency_key();
    let path = format!("/api/v1/clusters/{}/commands", seg(cluster));
    send_idempotent(server, reqwest::Method::POST, &path, body, &key).await
}

/// Sends a request carrying `Idempotency-Key: key`, up to three times while the transport
/// fails; the first HTTP answer counts.
pub async fn send_idempotent(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: &Value,
    key: &str,
) -> Result<Value> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match server
            .send(
                method.clone(),
                path,
                Some(body),
                true,
                &[("Idempotency-Key", key)],
            )
            .await
        {
            Ok((status, v)) => return check(status, v),
            Err(e) if attempt < 3 && e.downcast_ref::<reqwest::Error>().is_some() => {
                eprintln!("warning: {e:#}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a command acts on, in a few words.
fn command_title(c: &CommandRow) -> String {
    match &c.node {
        Some(n) => format!("{}, {}/{n}", c.kind, c.cluster),
        None => format!("{}, cluster {}", c.kind, c.cluster),
    }
}

/// One state as printed while following a command.
fn state_line(c: &CommandRow) -> String {
    let s = c.state.as_str();
    match (c.state, &c.delivered_to) {
        (CommandPhase::Delivered, Some(n)) => format!("  {s} to {n}"),
        (CommandPhase::Succeeded | CommandPhase::Running, _) if !c.outcome().is_empty() => {
            format!("  {s}: {}", c.outcome())
        }
        _ => format!("  {s}"),
    }
}

/// Follows a command from the answer that queued it until it is final, printing each state
/// change (or, with `json`, the final command). Succeeded is `Ok`; anything else an error
/// carrying the command's message.
pub async fn follow_command(server: &Server, first: Value, json: bool) -> Result<()> {
    let mut c: CommandRow =
        serde_json::from_value(first.clone()).context("read the queued command")?;
    let mut last_raw = first;
    if !json {
        println!("command {} ({})", c.id, command_title(&c));
    }
    let mut shown: Option<CommandPhase> = None;
    let mut failures = 0;
    loop {
        if shown != Some(c.state) {
            if !json {
                println!("{}", state_line(&c));
            }
            shown = Some(c.state);
        }
        if c.state.is_final() {
            break;
        }
        tokio::time::sleep(POLL).await;
        let path = format!("/api/v1/commands/{}", seg(&c.id));
        match server.get(&path).await {
            Ok(v) => {
                failures = 0;
                c = serde_json::from_value(v.clone()).context("read the command")?;
                last_raw = v;
            }
            // The server may restart or the network blip: the command goes on without us.
            Err(e) if failures < 20 && e.downcast_ref::<reqwest::Error>().is_some() => {
                failures += 1;
                eprintln!("warning: {e:#}; still following {}", c.id);
            }
            Err(e) => return Err(e.context(format!("follow command {}", c.id))),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&last_raw)?);
    }
    if c.state == CommandPhase::Succeeded {
        Ok(())
    } else {
        let why = if c.message.is_empty() {
            "no message".to_string()
        } else {
            c.message.clone()
        };
        bail!("command {} {}: {why}", c.id, c.state.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn problems_name_their_field_and_a_refused_token_gets_a_hint() {
        let p = json!({"type": "about:blank", "title": "Unprocessable Entity", "status": 422,
            "detail": "\"wizard\" is not viewer, operator or admin", "field": "role"});
        assert_eq!(
            problem_text(422, &p),
            "\"wizard\" is not viewer, operator or admin (field role)"
        );
        let p =
            json!({"title": "Unauthorized", "status": 401, "detail": "the API token is not valid"});
        let t = problem_text(401, &p);
        assert!(t.starts_with("the API token is not valid\nhint: "), "{t}");
        assert_eq!(
            problem_text(502, &Value::String("bad gateway".into())),
            "the server answered 502: bad gateway"
        );
        assert_eq!(problem_text(404, &Value::Null), "the server answered 404");
        let p = json!({"status": 503, "detail": "no agent of this cluster answered"});
        assert_eq!(problem_text(503, &p), "no agent of this cluster answered");
        assert!(check(200, json!({})).is_ok());
        assert!(check(404, json!({"detail": "no cluster"})).is_err());
    }

    #[test]
    fn idempotency_keys_differ() {
        let (a, b) = (idempotency_key(), idempotency_key());
        assert_ne!(a, b);
        assert!(a.starts_with("pgwardenctl-") && a.len() == 12 + 32, "{a}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("main"), "main");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
        assert_eq!(seg("ann@x.org"), "ann%40x.org");
    }

    #[test]
    fn an_https_server_needs_a_ca_and_the_api_prefix_is_dropped() {
        let e = Server::new("https://cp:9443", None, None, None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--ca"), "{e}");
        let s = Server::new("http://cp:9443/api/v1/", None, None, None, None).unwrap();
        assert_eq!(s.base, "http://cp:9443");
        assert!(Server::new("cp:9443", None, None, None, None).is_err());
        assert!(s.token().unwrap_err().to_string().contains("login"));
    }

    #[test]
    fn state_lines() {
        let mut c = CommandRow {
            id: "cmd-1".into(),
            cluster: "main".into(),
            node: None,
            kind: "pause".into(),
            state: CommandPhase::Queued,
            message: String::new(),
            delivered_to: None,
            result: None,
        };
        assert_eq!(command_title(&c), "pause, cluster main");
        assert_eq!(state_line(&c), "  queued");
        c.state = CommandPhase::Delivered;
        c.delivered_to = Some("n1".into());
        assert_eq!(state_line(&c), "  delivered to n1");
        c.state = CommandPhase::Succeeded;
        c.message = "maintenance mode on".into();
        assert_eq!(state_line(&c), "  succeeded: maintenance mode on");
        c.node = Some("n2".into());
        c.kind = "restart".into();
        assert_eq!(command_title(&c), "restart, main/n2");
        c.kind = "config".into();
        c.message = "done (200)".into();
        c.result = Some(serde_json::json!({"status": 200, "body": {"config": {"version": 8}}}));
        assert_eq!(
            state_line(&c),
            "  succeeded: configuration version 8 applied"
        );
    }
}
