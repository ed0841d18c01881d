//! `edit-config` / `config edit`: the dynamic configuration as an editable TOML text, the
//! patch (with a readable diff) that an edited text amounts to, and the patch of
//! `config set KEY=VALUE …`.

use anyhow::{anyhow, bail, Context, Result};
use pgwarden_core::dynconfig::{ConfigPatch, DynamicConfig, FailoverSettings};
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

/// The lease and failover settings, as top-level keys of the edited text, in this order.
const SETTINGS: [&str; 6] = [
    "ttl",
    "clock_drift",
    "maximum_lag_on_failover",
    "primary_start_timeout",
    "synchronous_mode",
    "synchronous_node_count",
];

/// The failover settings as TOML values, in the order of `SETTINGS`: durations and the mode
/// as strings, byte counts and the node count as integers.
fn settings(f: &FailoverSettings) -> [toml::Value; 6] {
    let s = |v: String| toml::Value::String(v);
    let i = |v: u64| match i64::try_from(v) {
        Ok(n) => toml::Value::Integer(n),
        Err(_) => toml::Value::String(v.to_string()),
    };
    [
        s(f.ttl.to_string()),
        s(f.clock_drift.to_string()),
        i(f.maximum_lag_on_failover),
        s(f.primary_start_timeout.to_string()),
        s(f.synchronous_mode.to_string()),
        i(u64::from(f.synchronous_node_count)),
    ]
}

/// The text an operator edits.
pub fn to_editable(c: &DynamicConfig) -> String {
    let mut out = format!(
        "# pgwarden dynamic configuration, version {}.\n\
         # Edit and save. Remove a setting's line to reset it to its default, a parameter's\n\
         # line to reset it to the node files' value.\n\
         \n\
         # The lease and failover (docs/failover.md).\n",
        c.version
    );
    for (k, v) in SETTINGS.iter().zip(settings(&c.failover)) {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out.push_str("\npg_hba = [\n");
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
    ttl: Option<toml::Value>,
    clock_drift: Option<toml::Value>,
    maximum_lag_on_failover: Option<toml::Value>,
    primary_start_timeout: Option<toml::Value>,
    synchronous_mode: Option<toml::Value>,
    synchronous_node_count: Option<toml::Value>,
}

impl Edited {
    /// The edited failover settings, in the order of `SETTINGS`.
    fn settings(&self) -> [&Option<toml::Value>; 6] {
        [
            &self.ttl,
            &self.clock_drift,
            &self.maximum_lag_on_failover,
            &self.primary_start_timeout,
            &self.synchronous_mode,
            &self.synchronous_node_count,
        ]
    }
}

/// A setting the patch carries as a string (a duration, the synchronous mode). A bare
/// integer is passed on as written; the agent validates the value.
fn setting_string(k: &str, v: &toml::Value) -> Result<String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        other => bail!("{k} = {other}: write it as a string, like {k} = \"3s\""),
    }
}

/// A setting the patch carries as JSON (a number, or a size string); the agent validates it.
fn setting_json(k: &str, v: &toml::Value) -> Result<serde_json::Value> {
    to_json(v).map_err(|_| anyhow!("{k} = {v}: write a number or a string"))
}

/// Sets one failover setting in the patch, as its type there requires.
fn set_setting(patch: &mut ConfigPatch, k: &str, v: &toml::Value) -> Result<()> {
    match k {
        "ttl" => patch.ttl = Some(setting_string(k, v)?),
        "clock_drift" => patch.clock_drift = Some(setting_string(k, v)?),
        "primary_start_timeout" => patch.primary_start_timeout = Some(setting_string(k, v)?),
        "synchronous_mode" => patch.synchronous_mode = Some(setting_string(k, v)?),
        "maximum_lag_on_failover" => patch.maximum_lag_on_failover = Some(setting_json(k, v)?),
        "synchronous_node_count" => patch.synchronous_node_count = Some(setting_json(k, v)?),
        _ => bail!("{k} is not a failover setting"),
    }
    Ok(())
}

/// The patch an edited text amounts to, and its diff (`-`/`+` lines). Empty when unchanged.
pub fn patch_from(c: &DynamicConfig, text: &str) -> Result<(ConfigPatch, Vec<String>)> {
    let e: Edited = toml::from_str(text).context("the edited configuration is not valid")?;
    let mut patch = ConfigPatch::default();
    let mut diff = Vec::new();
    let defaults = settings(&FailoverSettings::default());
    for (i, (k, o)) in SETTINGS.iter().zip(settings(&c.failover)).enumerate() {
        // A removed line means the default.
        let v = e.settings()[i].as_ref().unwrap_or(&defaults[i]);
        if *v != o {
            diff.push(format!("-{k} = {o}"));
            diff.push(format!("+{k} = {v}"));
            set_setting(&mut patch, k, v)?;
        }
    }
    if let Some(k) = e.parameters.keys().find(|k| SETTINGS.contains(&k.as_str())) {
        bail!(
            "parameters.{k}: {k} is a pgwarden setting, not a PostgreSQL parameter: \
             put it above [parameters]"
        );
    }
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

/// Opens `text` in `$VISUAL` or `$EDITOR` (`vi` by default) and returns the saved text.
pub fn edit_in_editor(text: &str) -> Result<String> {
    let file = std::env::temp_dir().join(format!("pgwarden-config-{}.toml", std::process::id()));
    std::fs::write(&file, text).with_context(|| format!("write {}", file.display()))?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&file)
        .status()
        .with_context(|| format!("run the editor {editor}"));
    let edited = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()));
    let _ = std::fs::remove_file(&file);
    let st = st?;
    if !st.success() {
        bail!("the editor exited with {st}; nothing changed");
    }
    edited
}

/// A `config set` value: an integer, a float or a boolean as such, anything else a string.
fn set_value(v: &str) -> serde_json::Value {
    if let Ok(i) = v.parse::<i64>() {
        if !v.starts_with('0') || v == "0" {
            return serde_json::Value::from(i);
        }
    }
    if v.contains('.') {
        if let Ok(f) = v.parse::<f64>() {
            return serde_json::Value::from(f);
        }
    }
    match v {
        "true" => serde_json::Value::Bool(true),
        "false" => serde_json::Value::Bool(false),
        _ => serde_json::Value::String(v.to_string()),
    }
}

/// The patch of `config set KEY=VALUE …`: a failover setting (`ttl=5s`; empty: back to its
/// default), `pg_hba=LINE` (every `pg_hba=` together are the new list; `pg_hba=` alone empties
/// it), or a PostgreSQL parameter (`work_mem=16MB`, `parameters.work_mem=16MB`; empty: back
/// to the node files' value).
pub fn patch_from_assignments(args: &[String]) -> Result<ConfigPatch> {
    if args.is_empty() {
        bail!("nothing to set: give KEY=VALUE, e.g. ttl=5s or work_mem=16MB");
    }
    let mut patch = ConfigPatch::default();
    let defaults = settings(&FailoverSettings::default());
    let mut hba: Option<Vec<String>> = None;
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            bail!("{a:?}: expected KEY=VALUE, e.g. ttl=5s or work_mem=16MB");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            bail!("{a:?}: the key is empty");
        }
        if let Some(i) = SETTINGS.iter().position(|s| *s == k) {
            let value = if v.is_empty() {
                defaults[i].clone()
            } else {
                match set_value(v) {
                    serde_json::Value::Number(n) if n.is_i64() => {
                        toml::Value::Integer(n.as_i64().unwrap_or_default())
                    }
                    _ => toml::Value::String(v.to_string()),
                }
            };
            set_setting(&mut patch, k, &value)?;
            continue;
        }
        if k == "pg_hba" {
            let list = hba.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                list.push(v.to_string());
            }
            continue;
        }
        let name = k.strip_prefix("parameters.").unwrap_or(k);
        if SETTINGS.contains(&name) {
            bail!(
                "parameters.{name}: {name} is a pgwarden setting, not a PostgreSQL parameter: \
                 set it as {name}={v}"
            );
        }
        let value = (!v.is_empty()).then(|| set_value(v));
        patch.parameters.insert(name.to_string(), value);
    }
    patch.pg_hba = hba;
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::duration::ConfDuration;
    use pgwarden_core::dynconfig::SyncMode;

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
        // The failover settings are top-level keys, before pg_hba and [parameters].
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        };
        for line in [
            "\nttl = \"3s\"\n",
            "\nclock_drift = \"500ms\"\n",
            "\nmaximum_lag_on_failover = 1048576\n",
            "\nprimary_start_timeout = \"30s\"\n",
            "\nsynchronous_mode = \"off\"\n",
            "\nsynchronous_node_count = 1\n",
        ] {
            assert!(pos(line) < pos("\npg_hba = ["), "{text}");
            assert!(pos(line) < pos("\n[parameters]"), "{text}");
        }
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(p, ConfigPatch::default());
        assert!(diff.is_empty(), "{diff:?}");

        // Settings other than the defaults come back unchanged too.
        let mut c = config();
        c.failover.ttl = ConfDuration::millis(1200);
        c.failover.clock_drift = ConfDuration::millis(100);
        c.failover.maximum_lag_on_failover = 16 << 20;
        c.failover.synchronous_mode = SyncMode::Strict;
        c.failover.synchronous_node_count = 2;
        let text = to_editable(&c);
        assert!(text.contains("\nttl = \"1200ms\"\n"), "{text}");
        assert!(text.contains("\nsynchronous_mode = \"strict\"\n"), "{text}");
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(p, ConfigPatch::default());
        assert!(diff.is_empty(), "{diff:?}");
    }

    #[test]
    fn changed_failover_settings_become_top_level_patch_fields() {
        let c = config();
        let text = to_editable(&c)
            .replace("ttl = \"3s\"", "ttl = \"5s\"")
            .replace("synchronous_mode = \"off\"", "synchronous_mode = \"on\"");
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(
            p,
            ConfigPatch {
                ttl: Some("5s".into()),
                synchronous_mode: Some("on".into()),
                ..Default::default()
            }
        );
        assert_eq!(
            diff,
            [
                "-ttl = \"3s\"",
                "+ttl = \"5s\"",
                "-synchronous_mode = \"off\"",
                "+synchronous_mode = \"on\"",
            ]
        );
    }

    #[test]
    fn failover_values_pass_through_to_the_agent() {
        let c = config();
        let text = to_editable(&c)
            .replace(
                "maximum_lag_on_failover = 1048576",
                "maximum_lag_on_failover = \"16MB\"",
            )
            .replace("synchronous_node_count = 1", "synchronous_node_count = 0")
            .replace("clock_drift = \"500ms\"", "clock_drift = \"forever\"");
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(p.maximum_lag_on_failover, Some(serde_json::json!("16MB")));
        assert_eq!(p.synchronous_node_count, Some(serde_json::json!(0)));
        assert_eq!(p.clock_drift.as_deref(), Some("forever"));
        assert!(
            diff.contains(&"+maximum_lag_on_failover = \"16MB\"".to_string()),
            "{diff:?}"
        );
        assert!(
            diff.contains(&"-maximum_lag_on_failover = 1048576".to_string()),
            "{diff:?}"
        );
    }

    #[test]
    fn a_removed_failover_setting_goes_back_to_its_default() {
        let mut c = config();
        c.failover.ttl = ConfDuration::secs(5);
        let text = to_editable(&c).replace("ttl = \"5s\"\n", "");
        let (p, diff) = patch_from(&c, &text).unwrap();
        assert_eq!(
            p,
            ConfigPatch {
                ttl: Some("3s".into()),
                ..Default::default()
            }
        );
        assert_eq!(diff, ["-ttl = \"5s\"", "+ttl = \"3s\""]);
        // A default setting removed: nothing to do.
        let c = config();
        let text = to_editable(&c).replace("ttl = \"3s\"\n", "");
        assert_eq!(patch_from(&c, &text).unwrap().0, ConfigPatch::default());
    }

    #[test]
    fn an_unknown_or_misplaced_key_is_named() {
        let c = config();
        let text = to_editable(&c).replace("ttl = ", "tll = ");
        let e = format!("{:#}", patch_from(&c, &text).unwrap_err());
        assert!(e.contains("unknown field `tll`"), "{e}");
        // A setting below [parameters] would become a PostgreSQL parameter.
        let text = to_editable(&c).replace("[parameters]\n", "[parameters]\nttl = \"5s\"\n");
        let e = format!("{:#}", patch_from(&c, &text).unwrap_err());
        assert!(e.starts_with("parameters.ttl: "), "{e}");
        let text = to_editable(&c).replace("ttl = \"3s\"", "ttl = [3]");
        let e = format!("{:#}", patch_from(&c, &text).unwrap_err());
        assert!(e.starts_with("ttl = [3]: "), "{e}");
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
    fn assignments_become_a_patch() {
        let args: Vec<String> = [
            "ttl=5s",
            "maximum_lag_on_failover=16777216",
            "synchronous_node_count=",
            "work_mem=16MB",
            "parameters.max_connections=200",
            "log_connections=true",
            "random_page_cost=1.1",
            "unix_socket_permissions=0700",
            "shared_buffers=",
            "pg_hba=host all all 10.0.0.0/8 scram-sha-256",
            "pg_hba=host all all 10.1.0.0/16 scram-sha-256",
        ]
        .map(String::from)
        .to_vec();
        let p = patch_from_assignments(&args).unwrap();
        assert_eq!(p.ttl.as_deref(), Some("5s"));
        assert_eq!(p.maximum_lag_on_failover, Some(serde_json::json!(16777216)));
        assert_eq!(p.synchronous_node_count, Some(serde_json::json!(1)));
        let j = |v: serde_json::Value| Some(v);
        assert_eq!(p.parameters["work_mem"], j(serde_json::json!("16MB")));
        assert_eq!(p.parameters["max_connections"], j(serde_json::json!(200)));
        assert_eq!(p.parameters["log_connections"], j(serde_json::json!(true)));
        assert_eq!(p.parameters["random_page_cost"], j(serde_json::json!(1.1)));
        assert_eq!(
            p.parameters["unix_socket_permissions"],
            j(serde_json::json!("0700"))
        );
        assert_eq!(p.parameters["shared_buffers"], None);
        assert_eq!(p.pg_hba.as_ref().map(Vec::len), Some(2));
        assert_eq!(
            patch_from_assignments(&["pg_hba=".into()]).unwrap().pg_hba,
            Some(vec![])
        );
        for bad in ["ttl", "=1", "parameters.ttl=5s"] {
            assert!(patch_from_assignments(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(patch_from_assignments(&[]).is_err());
    }

    #[test]
    fn a_broken_edit_is_an_error() {
        assert!(patch_from(&config(), "[parameters\nx = 1").is_err());
        assert!(patch_from(&config(), "paramters = 1").is_err());
        assert!(patch_from(&config(), "[parameters]\nwork_mem = [1]").is_err());
    }
}
