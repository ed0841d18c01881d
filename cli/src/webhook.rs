//! `pgwardenctl webhook`: the server's webhooks (`/api/v1/webhooks`): list, add, set, delete,
//! a test send followed to its outcome, and the delivery log.

use crate::remote::{pretty, print, read_secret};
use crate::server::{seg, Server};
use crate::{views, Cli, WebhookCmd, WebhookOpts};
use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

/// How often a test delivery is polled.
const POLL: Duration = Duration::from_millis(500);

/// How many deliveries are read to find the test delivery (newest first).
const SCAN: u16 = 100;

/// A list flag as the API takes it: `''` (an empty list) means every type or cluster.
fn list(items: &[String]) -> Value {
    json!(items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>())
}

/// The request fields of the options common to `add` and `set`.
fn opts_body(opts: &WebhookOpts, body: &mut Map<String, Value>) -> Result<()> {
    let secret = match (&opts.secret, opts.secret_stdin) {
        (Some(s), _) => Some(s.clone()),
        (None, true) => Some(read_secret("Signing secret: ", "signing secret")?),
        (None, false) => None,
    };
    if let Some(s) = secret {
        body.insert("secret".into(), json!(s));
    }
    if let Some(k) = &opts.routing_key {
        body.insert("routing_key".into(), json!(k));
    }
    if let Some(t) = &opts.types {
        body.insert("event_types".into(), list(t));
    }
    if let Some(c) = &opts.clusters {
        body.insert("clusters".into(), list(c));
    }
    if let Some(s) = &opts.min_severity {
        body.insert("min_severity".into(), json!(s));
    }
    Ok(())
}

fn path(id: &str) -> String {
    format!("/api/v1/webhooks/{}", seg(id))
}

pub async fn run(cli: &Cli, server: &Server, cmd: &WebhookCmd) -> Result<()> {
    match cmd {
        WebhookCmd::List => {
            let v = server.get("/api/v1/webhooks").await?;
            let items = v.as_array().cloned().unwrap_or_default();
            print(cli, &v, || {
                if items.is_empty() {
                    "no webhook: add one with `pgwardenctl webhook add --name N --url URL \
                     --format json`"
                        .into()
                } else {
                    views::webhooks(&items)
                }
            })
        }
        WebhookCmd::Add {
            name,
            url,
            format,
            opts,
            disabled,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.insert("url".into(), json!(url));
            body.insert("format".into(), json!(format));
            opts_body(opts, &mut body)?;
            if *disabled {
                body.insert("enabled".into(), json!(false));
            }
            let v = server
                .call(Method::POST, "/api/v1/webhooks", Some(&Value::Object(body)))
                .await?;
            print(cli, &v, || {
                let mut t = format!("added {}", views::webhook(&v));
                if let Some(s) = v["secret"].as_str() {
                    t.push_str(&format!(
                        "signing secret (made by the server, shown only once):\n  {s}\n"
                    ));
                }
                t
            })
        }
        WebhookCmd::Set {
            id,
            name,
            url,
            format,
            opts,
            enable,
            disable,
        } => {
            let mut body = Map::new();
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if let Some(u) = url {
                body.insert("url".into(), json!(u));
            }
            if let Some(f) = format {
                body.insert("format".into(), json!(f));
            }
            opts_body(opts, &mut body)?;
            if *enable || *disable {
                body.insert("enabled".into(), json!(*enable));
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give --name, --url, --format, --secret, \
                     --secret-stdin, --routing-key, --type, --cluster, --min-severity, \
                     --enable or --disable"
                );
            }
            let v = server
                .call(Method::PATCH, &path(id), Some(&Value::Object(body)))
                .await?;
            print(cli, &v, || format!("updated {}", views::webhook(&v)))
        }
        WebhookCmd::Delete { id } => {
            let v = server.call(Method::DELETE, &path(id), None).await?;
            print(cli, &v, || format!("webhook {id} deleted"))
        }
        WebhookCmd::Test { id, wait } => {
            let wait_for = pgwarden_core::duration::parse_duration(wait)
                .map_err(|e| anyhow!("--wait: {e}"))?;
            test(cli, server, id, wait, wait_for).await
        }
        WebhookCmd::Deliveries { id, state, limit } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(("state", s.clone()));
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            let v = server
                .get_query(&format!("{}/deliveries", path(id)), &q)
                .await?;
            let items = v.as_array().cloned().unwrap_or_default();
            let now = views::now_ms();
            print(cli, &v, || {
                if items.is_empty() {
                    format!("no delivery for webhook {id}")
                } else {
                    views::deliveries(&items, now)
                }
            })
        }
    }
}

/// Queues a test delivery and follows it in the delivery log until it is delivered or failed
/// (or `wait` passes), printing each attempt as it is recorded.
async fn test(cli: &Cli, server: &Server, id: &str, wait: &str, wait_for: Duration) -> Result<()> {
    let first = server
        .call(Method::POST, &format!("{}/test", path(id)), None)
        .await?;
    let delivery = first["id"]
        .as_i64()
        .ok_or_else(|| anyhow!("the server's answer names no delivery: {first}"))?;
    if !cli.json {
        println!(
            "test delivery {delivery} to webhook {id} queued (event {})",
            first["event_id"].as_str().unwrap_or_default()
        );
    }
    let deadline = Instant::now() + wait_for;
    let mut current = first;
    let mut shown = 0;
    let mut failures = 0;
    loop {
        let attempts = current["attempt_log"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !cli.json {
            for a in attempts.iter().skip(shown) {
                println!("  {}", views::attempt_line(a));
            }
        }
        shown = shown.max(attempts.len());
        let state = current["state"].as_str().unwrap_or_default().to_string();
        if state == "delivered" || state == "failed" || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
        let q = [("limit", SCAN.to_string())];
        match server
            .get_query(&format!("{}/deliveries", path(id)), &q)
            .await
        {
            Ok(v) => {
                failures = 0;
                current = v
                    .as_array()
                    .and_then(|a| a.iter().find(|d| d["id"].as_i64() == Some(delivery)))
                    .cloned()
                    .ok_or_else(|| {
                        anyhow!("test delivery {delivery} is no longer in the log of webhook {id}")
                    })?;
            }
            Err(e) if failures < 20 && e.downcast_ref::<reqwest::Error>().is_some() => {
                failures += 1;
                eprintln!("warning: {e:#}; still following delivery {delivery}");
            }
            Err(e) => return Err(e).context(format!("follow test delivery {delivery}")),
        }
    }
    if cli.json {
        println!("{}", pretty(&current)?);
    }
    let why = || {
        current["last_error"]
            .as_str()
            .map(String::from)
            .or_else(|| {
                current["attempt_log"]
                    .as_array()
                    .and_then(|a| a.last())
                    .map(views::attempt_outcome)
            })
            .unwrap_or_else(|| "no attempt yet".into())
    };
    match current["state"].as_str().unwrap_or_default() {
        "delivered" => {
            if !cli.json {
                println!("delivered");
            }
            Ok(())
        }
        "failed" => bail!("test delivery {delivery} failed: {}", why()),
        s => bail!(
            "test delivery {delivery} still {s} after {wait} ({}); the server keeps trying: \
             `pgwardenctl webhook deliveries {id}`",
            why()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_flag_means_everything() {
        assert_eq!(list(&["".into()]), json!([]));
        assert_eq!(
            list(&["agent_down".into(), " fenced".into()]),
            json!(["agent_down", "fenced"])
        );
    }

    #[test]
    fn options_become_the_api_fields() {
        let opts = WebhookOpts {
            secret: Some("0123456789abcdef".into()),
            routing_key: Some(String::new()),
            types: Some(vec!["agent_down".into()]),
            clusters: Some(vec![String::new()]),
            min_severity: Some("warning".into()),
            ..Default::default()
        };
        let mut body = Map::new();
        opts_body(&opts, &mut body).unwrap();
        assert_eq!(
            Value::Object(body),
            json!({"secret": "0123456789abcdef", "routing_key": "", "event_types": ["agent_down"],
                "clusters": [], "min_severity": "warning"})
        );
        let mut body = Map::new();
        opts_body(&WebhookOpts::default(), &mut body).unwrap();
        assert!(body.is_empty());
    }
}
