//! `edit-config`: the dynamic configuration as an editable TOML text, and the patch (with a
//! readable diff) that an edited text amounts to.

use anyhow::{bail, Context, Result};
use pgwarden_core::dynconfig::{ConfigPatch, DynamicConfig};
use std::collections::BTreeMap;

/// A `postgresql.conf` value as a TOML value: quoted strings become strings, numbers numbers,
/// anything else (on, off, 0700) a string.
fn to_toml(v: &str) -> toml::Value {
    if v.starts_with('\'') {
        return toml::Value::String(pgwarden_core::pgtext::unquote_conf(v));
    }
    if let Ok(i) = v.parse::<i64>() {
        if !v.starts_with('0') || v == "0" {
            return toml::Value::Integer(i);
        }
    }
    if let Ok(f) = v.parse::<f64>() {
        if v.contains('.') {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(v.to_string())
}

fn to_json(v: &toml::Value) -> Result<serde_json::Value> {
    Ok(match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Value::from(*f),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        other => bail!("{other} is not a parameter value: use a string, number or boolean"),
    })
}

/// The text an operator edits.
pub fn to_editable(c: &DynamicConfig) -> String {
    let mut out = format!(
        "# pgwarden dynamic configuration, version {}.\n\
         # Edit and save. Remove a line to reset that parameter to the node files' value.\n\
         pg_hba = [\n",
        c.version
    );
    for l in &c.pg_hba {
        out.push_str(&format!("    {},\n", toml::Value::String(l.clone())));
    }
    out.push_str("]\n\n[parameters]\n");
    for (k, v) in &c.parameters {
        out.push_str(&format!("{k} = {}\n", to_toml(v)));
    }
    out
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Edited {
    #[serde(default)]
    pg_hba: Vec<String>,
    #[serde(default)]
    parameters: BTreeMap<String, toml::Value>,
}

/// The patch an edited text amounts to, and its diff (`-`/`+` lines). Empty when unchanged.
pub fn patch_from(c: &DynamicConfig, text: &str) -> Result<(ConfigPatch, Vec<String>)> {
    let e: Edited = toml::from_str(text).context("the edited configuration is not valid")?;
    let mut patch = ConfigPatch::default();
    let mut diff = Vec::new();
    let old: BTreeMap<String, toml::Value> = c
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), to_toml(v)))
        .collect();
    for (k, v) in &e.parameters {
        if old.get(k) != Some(v) {
            if let Some(o) = old.get(k) {
                diff.push(format!("-{k} = {o}"));
            }
            diff.push(format!("+{k} = {v}"));
            patch
                .parameters
                .insert(k.clone(), Some(to_json(v).with_context(|| k.clone())?));
        }
    }
    for (k, o) in &old {
        if !e.parameters.contains_key(k) {
            diff.push(format!("-{k} = {o}"));
            patch.parameters.insert(k.clone(), None);
        }
    }
    if e.pg_hba != c.pg_hba {
        for l in &c.pg_hba {
            diff.push(format!("-pg_hba: {l}"));
        }
        for l in &e.pg_hba {
            diff.push(format!("+pg_hba: {l}"));
        }
        patch.pg_hba = Some(e.pg_hba);
    }
    Ok((patch, diff))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DynamicConfig {
        let mut c = DynamicConfig {
            version: 3,
            ..Default::default()
        };
        c.parameters.insert("work_mem".into(), "'7MB'".into());
        c.parameters.insert("max_connections".into(), "41".into());
        c.parameters.insert("log_connections".into(), "on".into());
        c.parameters
            .insert("unix_socket_permissions".into(), "0700".into());
        c.pg_hba
            .push("host all all 10.0.0.0/8 scram-sha-256".into());
        c
    }

    #[test]
    fn unchanged_text_is_no_patch() {
        let c = config();
        let text = to_editable(&c);
        assert!(text.contains("work_mem = \"7MB\""), "{text}");
        assert!(text.contains("max_connections = 41"), "{text}");
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(p, ConfigPatch::default());
        assert!(diff.is_empty(), "{diff:?}");
    }

    #[test]
    fn edits_become_a_patch_and_a_diff() {
        let c = config();
        let text = to_editable(&c)
            .replace("work_mem = \"7MB\"", "work_mem = \"9MB\"")
            .replace("max_connections = 41\n", "")
            .replace(
                "[parameters]\n",
                "[parameters]\nshared_buffers = \"64MB\"\n",
            );
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(p.parameters["work_mem"], Some(serde_json::json!("9MB")));
        assert_eq!(
            p.parameters["shared_buffers"],
            Some(serde_json::json!("64MB"))
        );
        assert_eq!(p.parameters["max_connections"], None);
        assert_eq!(p.parameters.len(), 3);
        assert!(p.pg_hba.is_none());
        assert!(
            diff.contains(&"-work_mem = \"7MB\"".to_string()),
            "{diff:?}"
        );
        assert!(
            diff.contains(&"+work_mem = \"9MB\"".to_string()),
            "{diff:?}"
        );
        assert!(
            diff.contains(&"-max_connections = 41".to_string()),
            "{diff:?}"
        );
        let text = to_editable(&c).replace("10.0.0.0/8", "10.1.0.0/16");
        let (p, _) = patch_from(&c, &text).unwrap();
        assert_eq!(
            p.pg_hba.unwrap(),
            vec!["host all all 10.1.0.0/16 scram-sha-256"]
        );
    }

    #[test]
    fn a_broken_edit_is_an_error() {
        assert!(patch_from(&config(), "[parameters\nx = 1").is_err());
        assert!(patch_from(&config(), "paramters = 1").is_err());
        assert!(patch_from(&config(), "[parameters]\nwork_mem = [1]").is_err());
    }
}
