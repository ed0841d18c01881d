//! The instance metadata service, IMDSv2 only: a session token from
//! `PUT /latest/api/token`, then `GET`s that carry it. The token is cached, renewed shortly
//! before it expires and again when the service answers 401 (it was revoked, or the clock
//! moved). Timeouts are short — the service is link-local — and a request is tried 3 times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::config::AwsSection;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The longest token lifetime the service grants (6 h).
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(21_600);
const TRIES: u32 = 3;

/// What the agent needs to know about its own instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    /// MAC of the ENI the endpoints are moved to.
    pub mac: String,
    pub eni_id: String,
    pub subnet_id: String,
    pub vpc_id: String,
    /// The subnet's CIDR, e.g. `10.77.0.0/24`.
    pub subnet_cidr: String,
    /// The ENI's primary private address.
    pub private_ip: String,
    pub vpc_cidr: String,
}

/// A client of the instance metadata service. Cloning shares the cached token.
#[derive(Clone, Debug)]
pub struct Imds {
    endpoint: String,
    http: reqwest::Client,
    token_ttl: Duration,
    token: Arc<Mutex<Option<Token>>>,
}

#[derive(Clone, Debug)]
struct Token {
    value: String,
    /// When the token is renewed: some time before the service expires it.
    renew_at: Instant,
}

/// What one request attempt came to.
enum Attempt {
    Done(String),
    /// Not worth retrying (e.g. 404: the path does not exist on this instance).
    Fatal(anyhow::Error),
    Retry(anyhow::Error),
}

impl Imds {
    /// `endpoint` is the service's base URL, e.g. `http://169.254.169.254`.
    pub fn new(endpoint: &str) -> Imds {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .unwrap_or_default();
        Imds {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http,
            token_ttl: DEFAULT_TOKEN_TTL,
            token: Arc::new(Mutex::new(None)),
        }
    }

    /// Asks for tokens of this lifetime (whole seconds, 1 s to 6 h) instead of 6 h; tests use
    /// a short one to see tokens renewed.
    pub fn with_token_ttl(mut self, ttl: Duration) -> Imds {
        self.token_ttl = ttl.clamp(Duration::from_secs(1), DEFAULT_TOKEN_TTL);
        self
    }

    /// The value at `path` under `/latest/`, e.g. `meta-data/instance-id`.
    pub async fn get(&self, path: &str) -> Result<String> {
        let url = format!("{}/latest/{}", self.endpoint, path.trim_start_matches('/'));
        let mut last = anyhow!("no attempt made");
        for attempt in 1..=TRIES {
            match self.try_get(&url).await {
                Attempt::Done(body) => return Ok(body),
                Attempt::Fatal(e) => return Err(e.context(format!("read {url}"))),
                Attempt::Retry(e) => last = e,
            }
            if attempt < TRIES {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
        }
        Err(last.context(format!("read {url} ({TRIES} tries)")))
    }

    async fn try_get(&self, url: &str) -> Attempt {
        let token = match self.token().await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(e),
        };
        let resp = match self.http.get(url).header(TOKEN_HEADER, token).send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(e.into()),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            // The token is no longer valid: get a new one on the next try.
            *self.token.lock().await = None;
            return Attempt::Retry(anyhow!("the metadata token was refused (401)"));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Attempt::Fatal(anyhow!("not found (404)"));
        }
        if !status.is_success() {
            return Attempt::Retry(anyhow!("HTTP {status}"));
        }
        match resp.text().await {
            Ok(body) => Attempt::Done(body),
            Err(e) => Attempt::Retry(e.into()),
        }
    }

    /// The cached session token, or a new one.
    async fn token(&self) -> Result<String> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let requested = Instant::now();
        let resp = self
            .http
            .put(format!("{}/latest/api/token", self.endpoint))
            .header(TTL_HEADER, self.token_ttl.as_secs().to_string())
            .send()
            .await
            .context("request a metadata session token")?;
        let status = resp.status();
        if !status.is_success() {
            bail!("the metadata service refused a session token: HTTP {status}");
        }
        // The service may grant less than asked for; it says so in the same header.
        let granted = resp
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(self.token_ttl);
        let value = resp
            .text()
            .await
            .context("read the metadata session token")?;
        let token = Token {
            value: value.trim().to_string(),
            renew_at: requested + granted - renew_margin(granted),
        };
        let out = token.value.clone();
        *cached = Some(token);
        Ok(out)
    }

    /// Who this instance is. `overrides.instance_id`, `eni_id` and `region` win over what the
    /// service says; the subnet and addresses are those of the ENI in use.
    pub async fn identity(&self, overrides: &AwsSection) -> Result<Identity> {
        let instance_id = match &overrides.instance_id {
            Some(id) => id.clone(),
            None => self.get("meta-data/instance-id").await?.trim().to_string(),
        };
        let availability_zone = self
            .get("meta-data/placement/availability-zone")
            .await?
            .trim()
            .to_string();
        let region = match &overrides.region {
            Some(r) => r.clone(),
            None => self.region(&availability_zone).await?,
        };
        let primary_mac = self.get("meta-data/mac").await?.trim().to_string();
        let (mac, eni_id) = match &overrides.eni_id {
            Some(eni) => (self.mac_of_eni(eni, &primary_mac).await?, eni.clone()),
            None => {
                let eni = self.mac_value(&primary_mac, "interface-id").await?;
                (primary_mac.clone(), eni)
            }
        };
        let private_ip = if mac == primary_mac {
            self.get("meta-data/local-ipv4").await?.trim().to_string()
        } else {
            let ips = self.mac_value(&mac, "local-ipv4s").await?;
            ips.lines().next().unwrap_or_default().trim().to_string()
        };
        Ok(Identity {
            instance_id,
            region,
            availability_zone,
            subnet_id: self.mac_value(&mac, "subnet-id").await?,
            vpc_id: self.mac_value(&mac, "vpc-id").await?,
            subnet_cidr: self.mac_value(&mac, "subnet-ipv4-cidr-block").await?,
            vpc_cidr: self.mac_value(&mac, "vpc-ipv4-cidr-block").await?,
            mac,
            eni_id,
            private_ip,
        })
    }

    async fn region(&self, availability_zone: &str) -> Result<String> {
        match self.get("meta-data/placement/region").await {
            Ok(r) => Ok(r.trim().to_string()),
            // Older metadata versions lack the path: the zone is the region plus a letter.
            Err(e) => availability_zone
                .strip_suffix(|c: char| c.is_ascii_lowercase())
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .ok_or(e),
        }
    }

    async fn mac_value(&self, mac: &str, key: &str) -> Result<String> {
        Ok(self
            .get(&format!("meta-data/network/interfaces/macs/{mac}/{key}"))
            .await?
            .trim()
            .to_string())
    }

    /// The MAC of the attached ENI `eni_id` (an override may name a secondary ENI).
    async fn mac_of_eni(&self, eni_id: &str, primary_mac: &str) -> Result<String> {
        let listing = self.get("meta-data/network/interfaces/macs/").await?;
        for mac in listing.lines().map(|l| l.trim().trim_end_matches('/')) {
            if mac.is_empty() {
                continue;
            }
            if self.mac_value(mac, "interface-id").await? == eni_id {
                return Ok(mac.to_string());
            }
        }
        tracing::warn!(
            eni = eni_id,
            "the configured ENI is not attached to this instance; using the primary interface's subnet"
        );
        Ok(primary_mac.to_string())
    }
}

/// How long before expiry a token is renewed: a minute, or a quarter of a short lifetime.
fn renew_margin(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_before_expiry() {
        assert_eq!(renew_margin(DEFAULT_TOKEN_TTL), Duration::from_secs(60));
        assert_eq!(
            renew_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn ttl_is_clamped() {
        let i = Imds::new("http://127.0.0.1:1").with_token_ttl(Duration::from_millis(10));
        assert_eq!(i.token_ttl, Duration::from_secs(1));
        let i = Imds::new("http://127.0.0.1:1/").with_token_ttl(Duration::from_secs(1 << 20));
        assert_eq!(i.token_ttl, DEFAULT_TOKEN_TTL);
        assert_eq!(i.endpoint, "http://127.0.0.1:1");
    }
}
