//! `pgwarden-server`'s configuration file (`server.toml`), parsed and validated here so errors
//! name the file, the line and the key, like the agent's.

use crate::config::{find_key_line, key_at_line, line_of, ConfigError};
use crate::duration::ConfDuration;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `address:port` of the HTTPS listener (API, agents, dashboard).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Holds the SQLite file (by default) and the PKI directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// `sqlite://path` or `postgres://user@host/db`; by default `sqlite://<data_dir>/pgwarden.db`.
    pub database_url: Option<String>,
    /// This server's name in the store's leases and claims; by default `<hostname>-<pid>`.
    pub server_id: Option<String>,
    #[serde(default)]
    pub tls: ServerTls,
    #[serde(default)]
    pub agents: AgentsSection,
    #[serde(default)]
    pub commands: CommandsSection,
    #[serde(default)]
    pub retention: RetentionSection,
    #[serde(default)]
    pub webhooks: WebhooksSection,
    /// `text` or `json` log lines.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

/// Where the CA and the server certificate are; by default in `<data_dir>/pki`
/// (`pgwarden-server init` creates them there).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub ca_file: Option<String>,
    pub ca_key_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// Names and addresses the server certificate is valid for (besides `localhost`), used by
    /// `init`.
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentsSection {
    /// How often agents report.
    #[serde(default = "default_report_interval")]
    pub report_interval: ConfDuration,
    /// An agent that has not reported for this long is polled, then marked down.
    #[serde(default = "default_down_after")]
    pub down_after: ConfDuration,
    /// Validity of the certificates signed at enrollment.
    #[serde(default = "default_certificate_days")]
    pub certificate_days: u32,
    /// Default lifetime of a join token.
    #[serde(default = "default_join_token_ttl")]
    pub join_token_ttl: ConfDuration,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandsSection {
    /// A command without an answer by then is `timed_out`.
    #[serde(default = "default_command_timeout")]
    pub timeout: ConfDuration,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Lag samples older than this are deleted.
    #[serde(default = "default_lag_retention")]
    pub lag_samples: ConfDuration,
    /// At most one lag sample per node per interval.
    #[serde(default = "default_lag_interval")]
    pub lag_sample_interval: ConfDuration,
}

/// Delivery of events to webhook endpoints (`docs/webhooks.md`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSection {
    /// How long one delivery attempt may take (connect, send, answer).
    #[serde(default = "default_webhook_timeout")]
    pub timeout: ConfDuration,
    /// A delivery still failing this long after its event is given up (`failed`).
    #[serde(default = "default_webhook_max_age")]
    pub max_age: ConfDuration,
    /// The first retry's delay ceiling; doubled at every attempt up to 5 minutes (full
    /// jitter). Not in the example file: shortened by tests.
    #[serde(default = "default_webhook_retry_base")]
    pub retry_base: ConfDuration,
}

fn default_listen() -> String {
    "0.0.0.0:8440".into()
}
fn default_data_dir() -> String {
    "/var/lib/pgwarden-server".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_report_interval() -> ConfDuration {
    ConfDuration::secs(2)
}
fn default_down_after() -> ConfDuration {
    ConfDuration::secs(10)
}
fn default_certificate_days() -> u32 {
    365
}
fn default_join_token_ttl() -> ConfDuration {
    ConfDuration::secs(3600)
}
fn default_command_timeout() -> ConfDuration {
    ConfDuration::secs(300)
}
fn default_lag_retention() -> ConfDuration {
    ConfDuration::secs(24 * 3600)
}
fn default_lag_interval() -> ConfDuration {
    ConfDuration::secs(10)
}

fn default_webhook_timeout() -> ConfDuration {
    ConfDuration::secs(10)
}
fn default_webhook_max_age() -> ConfDuration {
    ConfDuration::secs(24 * 3600)
}
fn default_webhook_retry_base() -> ConfDuration {
    ConfDuration::secs(1)
}

impl Default for WebhooksSection {
    fn default() -> Self {
        WebhooksSection {
            timeout: default_webhook_timeout(),
            max_age: default_webhook_max_age(),
            retry_base: default_webhook_retry_base(),
        }
    }
}

impl Default for AgentsSection {
    fn default() -> Self {
        AgentsSection {
            report_interval: default_report_interval(),
            down_after: default_down_after(),
            certificate_days: default_certificate_days(),
            join_token_ttl: default_join_token_ttl(),
        }
    }
}
impl Default for CommandsSection {
    fn default() -> Self {
        CommandsSection {
            timeout: default_command_timeout(),
        }
    }
}
impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            lag_samples: default_lag_retention(),
            lag_sample_interval: default_lag_interval(),
        }
    }
}

/// The backend a database URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn backend_of(url: &str) -> Option<Backend> {
    if url.starts_with("sqlite:") {
        Some(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(Backend::Postgres)
    } else {
        None
    }
}

impl ServerConfig {
    /// Parses and validates the text of `file`.
    pub fn parse(text: &str, file: &str) -> Result<ServerConfig, ConfigError> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let message = e.message().trim().to_string();
            let key = if message.starts_with("missing field") {
                None
            } else {
                line.and_then(|l| key_at_line(text, l))
            };
            ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
            }
        })?;
        let bad = |section: &str, key: &str, message: String| ConfigError {
            file: file.to_string(),
            line: if section.is_empty() {
                text.lines()
                    .position(|l| {
                        l.trim_start().starts_with(key)
                            && l.trim_start()[key.len()..].trim_start().starts_with('=')
                    })
                    .map(|i| i + 1)
            } else {
                find_key_line(text, section, None, key)
            },
            key: Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            }),
            message,
        };
        if cfg.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "",
                "listen",
                format!("{:?} is not an address:port", cfg.listen),
            ));
        }
        if let Some(u) = &cfg.database_url {
            if backend_of(u).is_none() {
                return Err(bad(
                    "",
                    "database_url",
                    "must start with sqlite: or postgres://".into(),
                ));
            }
        }
        if !matches!(cfg.log_format.as_str(), "text" | "json") {
            return Err(bad("", "log_format", "must be text or json".into()));
        }
        if cfg.agents.report_interval.0.as_millis() < 100 {
            return Err(bad(
                "agents",
                "report_interval",
                "must be at least 100ms".into(),
            ));
        }
        if cfg.agents.down_after <= cfg.agents.report_interval {
            return Err(bad(
                "agents",
                "down_after",
                "must be longer than agents.report_interval".into(),
            ));
        }
        if cfg.agents.certificate_days == 0 {
            return Err(bad(
                "agents",
                "certificate_days",
                "must be at least 1".into(),
            ));
        }
        let w = &cfg.webhooks;
        if w.timeout.0.as_millis() < 100 || w.timeout.0.as_secs() > 300 {
            return Err(bad(
                "webhooks",
                "timeout",
                "must be from 100ms to 5m".into(),
            ));
        }
        if w.max_age <= w.timeout {
            return Err(bad(
                "webhooks",
                "max_age",
                "must be longer than webhooks.timeout".into(),
            ));
        }
        if w.retry_base.0.as_millis() < 10 || w.retry_base.0.as_secs() > 300 {
            return Err(bad(
                "webhooks",
                "retry_base",
                "must be from 10ms to 5m".into(),
            ));
        }
        Ok(cfg)
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}/pgwarden.db",
                self.data_dir.trim_end_matches('/')
            )
        })
    }

    fn pki(&self, file: &str) -> String {
        format!("{}/pki/{file}", self.data_dir.trim_end_matches('/'))
    }
    pub fn ca_file(&self) -> String {
        self.tls
            .ca_file
            .clone()
            .unwrap_or_else(|| self.pki("ca.pem"))
    }
    pub fn ca_key_file(&self) -> String {
        self.tls
            .ca_key_file
            .clone()
            .unwrap_or_else(|| self.pki("ca.key"))
    }
    pub fn cert_file(&self) -> String {
        self.tls
            .cert_file
            .clone()
            .unwrap_or_else(|| self.pki("server.pem"))
    }
    pub fn key_file(&self) -> String {
        self.tls
            .key_file
            .clone()
            .unwrap_or_else(|| self.pki("server.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_embedded_defaults() {
        let c = ServerConfig::parse("", "server.toml").expect("parse");
        assert_eq!(c.listen, "0.0.0.0:8440");
        assert_eq!(
            c.database_url(),
            "sqlite:///var/lib/pgwarden-server/pgwarden.db"
        );
        assert_eq!(c.ca_file(), "/var/lib/pgwarden-server/pki/ca.pem");
        assert_eq!(c.agents.report_interval, ConfDuration::secs(2));
        assert_eq!(backend_of("postgres://u@h/db"), Some(Backend::Postgres));
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let text = include_str!("../../deploy/examples/server.toml");
        let c = ServerConfig::parse(text, "deploy/examples/server.toml").expect("example");
        assert_eq!(c.tls.hosts, vec!["pgwarden.example.net", "10.0.1.5"]);
        assert_eq!(c.commands.timeout, ConfDuration::secs(300));
        assert_eq!(c.webhooks, WebhooksSection::default());
    }

    #[test]
    fn webhook_settings_have_defaults_and_are_checked() {
        let c = ServerConfig::parse("", "s.toml").expect("defaults");
        assert_eq!(c.webhooks.timeout, ConfDuration::secs(10));
        assert_eq!(c.webhooks.max_age, ConfDuration::secs(24 * 3600));
        assert_eq!(c.webhooks.retry_base, ConfDuration::secs(1));
        let c = ServerConfig::parse(
            "[webhooks]\ntimeout = \"2s\"\nmax_age = \"1h\"\nretry_base = \"200ms\"\n",
            "s.toml",
        )
        .expect("set");
        assert_eq!(c.webhooks.timeout, ConfDuration::secs(2));
        assert_eq!(c.webhooks.max_age, ConfDuration::secs(3600));
        assert_eq!(c.webhooks.retry_base, ConfDuration::millis(200));
        let e = ServerConfig::parse("[webhooks]\ntimeout = \"50ms\"\n", "s.toml")
            .expect_err("short timeout");
        assert_eq!(e.key.as_deref(), Some("webhooks.timeout"));
        assert_eq!(e.line, Some(2));
        let e = ServerConfig::parse(
            "[webhooks]\ntimeout = \"30s\"\nmax_age = \"30s\"\n",
            "s.toml",
        )
        .expect_err("max_age");
        assert_eq!(e.key.as_deref(), Some("webhooks.max_age"));
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("webhooks.timeout"), "{e}");
        let e = ServerConfig::parse("[webhooks]\nretry_base = \"1ms\"\n", "s.toml")
            .expect_err("retry_base");
        assert_eq!(e.key.as_deref(), Some("webhooks.retry_base"));
        let e = ServerConfig::parse("[webhooks]\nmax_agee = \"1h\"\n", "s.toml")
            .expect_err("unknown key");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("max_agee"), "{e}");
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let e = ServerConfig::parse("listen = \"x\"\n", "s.toml").expect_err("bad listen");
        assert_eq!(
            e.to_string(),
            "s.toml:1: key `listen`: \"x\" is not an address:port"
        );
        let e = ServerConfig::parse(
            "data_dir = \"/d\"\n[agents]\nreport_intervall = \"1s\"\n",
            "s.toml",
        )
        .expect_err("unknown key");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("report_intervall"), "{e}");
        let e = ServerConfig::parse(
            "[agents]\nreport_interval = \"5s\"\ndown_after = \"5s\"\n",
            "s.toml",
        )
        .expect_err("down_after");
        assert_eq!(e.key.as_deref(), Some("agents.down_after"));
        assert_eq!(e.line, Some(3));
        let e = ServerConfig::parse("database_url = \"mysql://x\"\n", "s.toml").expect_err("url");
        assert_eq!(e.key.as_deref(), Some("database_url"));
        let e = ServerConfig::parse("[commands]\ntimeout = \"soon\"\n", "s.toml").expect_err("dur");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.key.as_deref(), Some("commands.timeout"));
    }
}
