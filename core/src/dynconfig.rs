//! The cluster's dynamic configuration: PostgreSQL parameters and `pg_hba.conf` lines that live
//! in the agents' replicated log, so one change reaches every node. Changes arrive as a patch,
//! are validated before they are committed (a bad value names its field), and are kept in a
//! history of who changed what, when.

use crate::config::{check_param_name, MANAGED_PARAMETERS};
use crate::duration::{parse_duration, ConfDuration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A parameter value as written in `postgresql.conf` (already quoted when needed).
pub type ConfValue = String;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynamicConfig {
    /// Bumped by every committed change.
    pub version: u64,
    pub parameters: BTreeMap<String, ConfValue>,
    /// Extra `pg_hba.conf` lines, after the agent's own and the node file's.
    pub pg_hba: Vec<String>,
    /// The lease and failover settings every member applies the same way.
    #[serde(default)]
    pub failover: FailoverSettings,
}

/// The lease's timing and the failover limits. They live in the replicated state because
/// every member must judge the lease with the same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverSettings {
    /// How long a lease lasts after each renewal. The holder renews every `ttl / 6`; a dead
    /// holder is replaced `ttl + clock_drift` after its last renewal.
    pub ttl: ConfDuration,
    /// The largest offset between two members' wall clocks the lease tolerates.
    pub clock_drift: ConfDuration,
    /// A replica further behind the old primary's last reported position is not promoted
    /// (asynchronous replication), in bytes.
    pub maximum_lag_on_failover: u64,
    /// How long the holder tries to restart a failed PostgreSQL in place before it gives the
    /// lease up so another member takes over.
    pub primary_start_timeout: ConfDuration,
    /// `off`: asynchronous replication. `on`: the primary keeps `synchronous_node_count`
    /// synchronous standbys when it can and degrades to asynchronous (with an event) when none
    /// is available. `strict`: writes block rather than run without a synchronous standby.
    pub synchronous_mode: SyncMode,
    pub synchronous_node_count: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    #[default]
    Off,
    On,
    Strict,
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Off => "off",
            SyncMode::On => "on",
            SyncMode::Strict => "strict",
        })
    }
}

impl Default for FailoverSettings {
    fn default() -> Self {
        FailoverSettings {
            ttl: ConfDuration::secs(3),
            clock_drift: ConfDuration::millis(500),
            maximum_lag_on_failover: 1 << 20,
            primary_start_timeout: ConfDuration::secs(30),
            synchronous_mode: SyncMode::Off,
            synchronous_node_count: 1,
        }
    }
}

impl FailoverSettings {
    pub fn ttl_ms(&self) -> u64 {
        self.ttl.0.as_millis() as u64
    }
    pub fn drift_ms(&self) -> u64 {
        self.clock_drift.0.as_millis() as u64
    }
    /// How often the holder renews.
    pub fn renew_interval_ms(&self) -> u64 {
        self.ttl_ms() / 6
    }
    /// How long before the end of its lease the holder stops accepting writes: time enough
    /// to stop PostgreSQL (an immediate shutdown) before anyone else may take over.
    pub fn margin_ms(&self) -> u64 {
        (self.ttl_ms() / 6).clamp(100, 500)
    }
}

/// `PATCH /v1/config`: parameters to set (a JSON string, number or boolean) or remove (`null`),
/// and optionally the whole list of extra `pg_hba` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    #[serde(default)]
    pub parameters: BTreeMap<String, Option<serde_json::Value>>,
    pub pg_hba: Option<Vec<String>>,
    /// `"3s"`, `"1500ms"`.
    pub ttl: Option<String>,
    pub clock_drift: Option<String>,
    /// Bytes, or a size like `"16MB"`.
    pub maximum_lag_on_failover: Option<serde_json::Value>,
    pub primary_start_timeout: Option<String>,
    /// `"off"`, `"on"` or `"strict"`.
    pub synchronous_mode: Option<String>,
    pub synchronous_node_count: Option<serde_json::Value>,
}

/// One changed setting: `None` on a side means absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub name: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChange {
    pub version: u64,
    pub at_ms: u64,
    pub by: String,
    pub changes: Vec<Change>,
}

/// A patch refused: the JSON field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct PatchError {
    pub field: String,
    pub message: String,
}

/// Renders a JSON value for `postgresql.conf`.
fn conf_value(field: &str, v: &serde_json::Value) -> Result<ConfValue, PatchError> {
    match v {
        serde_json::Value::String(s) => {
            if s.contains('\n') {
                return Err(PatchError {
                    field: field.into(),
                    message: "a value may not contain a line break".into(),
                });
            }
            Ok(crate::pgtext::quote_conf(s))
        }
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(if *b { "on" } else { "off" }.into()),
        _ => Err(PatchError {
            field: field.into(),
            message: "must be a string, a number, a boolean, or null to remove it".into(),
        }),
    }
}

/// Validates a patch against the rules every node applies; returns the resulting
/// configuration and what changed. Nothing is committed when this fails.
pub fn apply_patch(
    current: &DynamicConfig,
    patch: &ConfigPatch,
) -> Result<(DynamicConfig, Vec<Change>), PatchError> {
    let mut next = current.clone();
    let mut changes = Vec::new();
    for (name, value) in &patch.parameters {
        let field = format!("parameters.{name}");
        let err = |m: String| PatchError {
            field: field.clone(),
            message: m,
        };
        check_param_name(name).map_err(err)?;
        if MANAGED_PARAMETERS.contains(&name.as_str()) {
            return Err(err(format!(
                "{name} is set by pgwarden for each node and cannot be configured"
            )));
        }
        let new = match value {
            None => None,
            Some(v) => Some(conf_value(&field, v)?),
        };
        if name == "wal_level" && !matches!(new.as_deref(), Some("'replica'") | Some("'logical'")) {
            return Err(err(
                "wal_level must be replica or logical for replication".into()
            ));
        }
        let old = match &new {
            Some(v) => next.parameters.insert(name.clone(), v.clone()),
            None => next.parameters.remove(name),
        };
        if old != new {
            changes.push(Change {
                name: name.clone(),
                old,
                new,
            });
        }
    }
    if let Some(lines) = &patch.pg_hba {
        for (i, l) in lines.iter().enumerate() {
            if l.contains('\n') || l.trim().is_empty() || l.trim_start().starts_with('#') {
                return Err(PatchError {
                    field: format!("pg_hba[{i}]"),
                    message: format!("{l:?} is not one pg_hba.conf rule"),
                });
            }
        }
        if *lines != next.pg_hba {
            changes.push(Change {
                name: "pg_hba".into(),
                old: Some(next.pg_hba.join("\n")),
                new: Some(lines.join("\n")),
            });
            next.pg_hba = lines.clone();
        }
    }
    patch_failover(&mut next.failover, patch, &mut changes)?;
    if !changes.is_empty() {
        next.version = current.version + 1;
    }
    Ok((next, changes))
}

fn patch_failover(
    f: &mut FailoverSettings,
    patch: &ConfigPatch,
    changes: &mut Vec<Change>,
) -> Result<(), PatchError> {
    let err = |field: &str, message: String| PatchError {
        field: field.into(),
        message,
    };
    let dur = |field: &str, v: &str| {
        parse_duration(v)
            .map(ConfDuration)
            .map_err(|m| err(field, m))
    };
    let mut next = *f;
    if let Some(v) = &patch.ttl {
        next.ttl = dur("ttl", v)?;
    }
    if let Some(v) = &patch.clock_drift {
        next.clock_drift = dur("clock_drift", v)?;
    }
    if let Some(v) = &patch.primary_start_timeout {
        next.primary_start_timeout = dur("primary_start_timeout", v)?;
    }
    if let Some(v) = &patch.maximum_lag_on_failover {
        let field = "maximum_lag_on_failover";
        next.maximum_lag_on_failover = match v {
            serde_json::Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| err(field, format!("{n} is not a number of bytes")))?,
            serde_json::Value::String(s) => {
                crate::lsn::parse_size(s).map_err(|e| err(field, e.to_string()))?
            }
            _ => return Err(err(field, "must be bytes or a size like \"16MB\"".into())),
        };
    }
    if let Some(v) = &patch.synchronous_mode {
        next.synchronous_mode = match v.as_str() {
            "off" => SyncMode::Off,
            "on" => SyncMode::On,
            "strict" => SyncMode::Strict,
            _ => {
                return Err(err(
                    "synchronous_mode",
                    format!("{v:?} is not one of off, on, strict"),
                ))
            }
        };
    }
    if let Some(v) = &patch.synchronous_node_count {
        next.synchronous_node_count =
            v.as_u64().filter(|n| (1..=16).contains(n)).ok_or_else(|| {
                err(
                    "synchronous_node_count",
                    format!("{v} is not a number from 1 to 16"),
                )
            })? as u32;
    }
    if next.ttl < ConfDuration::millis(600) || next.ttl > ConfDuration::secs(600) {
        return Err(err(
            "ttl",
            format!("{} must be between 600ms and 10m", next.ttl),
        ));
    }
    if next.drift_ms() * 2 > next.ttl_ms() {
        return Err(err(
            "clock_drift",
            format!(
                "{} must be at most half the ttl ({})",
                next.clock_drift, next.ttl
            ),
        ));
    }
    let mut note = |name: &str, old: String, new: String| {
        if old != new {
            changes.push(Change {
                name: name.into(),
                old: Some(old),
                new: Some(new),
            });
        }
    };
    note("ttl", f.ttl.to_string(), next.ttl.to_string());
    note(
        "clock_drift",
        f.clock_drift.to_string(),
        next.clock_drift.to_string(),
    );
    note(
        "maximum_lag_on_failover",
        f.maximum_lag_on_failover.to_string(),
        next.maximum_lag_on_failover.to_string(),
    );
    note(
        "primary_start_timeout",
        f.primary_start_timeout.to_string(),
        next.primary_start_timeout.to_string(),
    );
    note(
        "synchronous_mode",
        f.synchronous_mode.to_string(),
        next.synchronous_mode.to_string(),
    );
    note(
        "synchronous_node_count",
        f.synchronous_node_count.to_string(),
        next.synchronous_node_count.to_string(),
    );
    *f = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: serde_json::Value) -> ConfigPatch {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn sets_changes_and_removes_parameters() {
        let c0 = DynamicConfig::default();
        let (c1, ch) = apply_patch(&c0, &patch(json!({"parameters": {"work_mem": "8MB", "max_connections": 200, "log_connections": true}}))).unwrap();
        assert_eq!(c1.version, 1);
        assert_eq!(c1.parameters["work_mem"], "'8MB'");
        assert_eq!(c1.parameters["max_connections"], "200");
        assert_eq!(c1.parameters["log_connections"], "on");
        assert_eq!(ch.len(), 3);
        let (c2, ch) = apply_patch(
            &c1,
            &patch(json!({"parameters": {"work_mem": null, "max_connections": 200}})),
        )
        .unwrap();
        assert_eq!(c2.version, 2);
        assert!(!c2.parameters.contains_key("work_mem"));
        assert_eq!(
            ch,
            vec![Change {
                name: "work_mem".into(),
                old: Some("'8MB'".into()),
                new: None
            }]
        );
        let (c3, ch) =
            apply_patch(&c2, &patch(json!({"parameters": {"max_connections": 200}}))).unwrap();
        assert!(ch.is_empty());
        assert_eq!(c3.version, 2, "a no-op does not bump the version");
    }

    #[test]
    fn bad_patches_name_the_field() {
        let c = DynamicConfig::default();
        let e = apply_patch(&c, &patch(json!({"parameters": {"port": 5433}}))).unwrap_err();
        assert_eq!(e.field, "parameters.port");
        let e = apply_patch(&c, &patch(json!({"parameters": {"work mem": "1MB"}}))).unwrap_err();
        assert_eq!(e.field, "parameters.work mem");
        let e = apply_patch(&c, &patch(json!({"parameters": {"work_mem": ["1MB"]}}))).unwrap_err();
        assert_eq!(e.field, "parameters.work_mem");
        let e =
            apply_patch(&c, &patch(json!({"parameters": {"wal_level": "minimal"}}))).unwrap_err();
        assert_eq!(e.field, "parameters.wal_level");
        let e =
            apply_patch(&c, &patch(json!({"parameters": {"search_path": "a\nb"}}))).unwrap_err();
        assert_eq!(e.field, "parameters.search_path");
        let e = apply_patch(
            &c,
            &patch(json!({"pg_hba": ["host all all 10.0.0.0/8 scram-sha-256", ""]})),
        )
        .unwrap_err();
        assert_eq!(e.field, "pg_hba[1]");
        assert!(serde_json::from_value::<ConfigPatch>(json!({"paramters": {}})).is_err());
    }

    #[test]
    fn failover_settings_are_validated_and_recorded() {
        let c = DynamicConfig::default();
        assert_eq!(c.failover.ttl_ms(), 3000);
        assert_eq!(c.failover.renew_interval_ms(), 500);
        let (c1, ch) = apply_patch(
            &c,
            &patch(
                json!({"ttl": "1200ms", "clock_drift": "100ms", "maximum_lag_on_failover": "16MB"}),
            ),
        )
        .unwrap();
        assert_eq!(c1.failover.ttl_ms(), 1200);
        assert_eq!(c1.failover.drift_ms(), 100);
        assert_eq!(c1.failover.maximum_lag_on_failover, 16 << 20);
        assert_eq!(c1.version, 1);
        let names: Vec<_> = ch.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["ttl", "clock_drift", "maximum_lag_on_failover"]);
        assert_eq!(ch[0].old.as_deref(), Some("3s"));
        for (body, field) in [
            (json!({"ttl": "1x"}), "ttl"),
            (json!({"ttl": "100ms"}), "ttl"),
            (json!({"clock_drift": "2s"}), "clock_drift"),
            (
                json!({"maximum_lag_on_failover": true}),
                "maximum_lag_on_failover",
            ),
            (
                json!({"maximum_lag_on_failover": "lots"}),
                "maximum_lag_on_failover",
            ),
            (
                json!({"primary_start_timeout": "soon"}),
                "primary_start_timeout",
            ),
        ] {
            let e = apply_patch(&c, &patch(body.clone())).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
        // Settings from before the field existed read as the defaults.
        let old: DynamicConfig =
            serde_json::from_value(json!({"version": 2, "parameters": {}, "pg_hba": []})).unwrap();
        assert_eq!(old.failover, FailoverSettings::default());
    }

    #[test]
    fn pg_hba_replaced_as_a_whole() {
        let c = DynamicConfig::default();
        let (c1, ch) = apply_patch(
            &c,
            &patch(json!({"pg_hba": ["host all all 10.0.0.0/8 scram-sha-256"]})),
        )
        .unwrap();
        assert_eq!(c1.pg_hba.len(), 1);
        assert_eq!(ch[0].name, "pg_hba");
        assert_eq!(c1.version, 1);
    }

    #[test]
    fn values_are_quoted_for_postgresql_conf() {
        let (c, _) = apply_patch(
            &DynamicConfig::default(),
            &patch(json!({"parameters": {"application_name": "it's"}})),
        )
        .unwrap();
        assert_eq!(c.parameters["application_name"], "'it''s'");
    }
}
