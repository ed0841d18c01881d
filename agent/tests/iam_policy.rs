//! `deploy/aws/iam-policy.json` grants exactly what the agent calls: the EC2 operations
//! called in `agent/src/aws/ec2.rs` (found by scanning the source for SDK operation calls on
//! the client), `EC2_ACTIONS` and the policy's actions are the same set. A new SDK call
//! without a policy update fails here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pgwarden_agent::aws::EC2_ACTIONS;
use serde_json::Value;

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `assign_private_ip_addresses` → `AssignPrivateIpAddresses`.
fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The operations called on the SDK client: `client` `.` `operation_name` `(` `)`, with any
/// whitespace (rustfmt breaks chains over lines) between the tokens. Comments are skipped.
fn sdk_operations(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut ops = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("client") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "client".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let after = rest.trim_start();
        let Some(after) = after.strip_prefix('.') else {
            continue;
        };
        let after = after.trim_start();
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let call = after[name.len()..].trim_start();
        if !name.is_empty() && call.starts_with('(') && call[1..].trim_start().starts_with(')') {
            ops.insert(pascal(&name));
        }
    }
    ops
}

/// Every action the policy allows, without the `ec2:` prefix, with the statements' effects.
fn policy_actions(policy: &Value) -> BTreeSet<String> {
    let statements = policy["Statement"].as_array().expect("Statement is a list");
    let mut actions = BTreeSet::new();
    for s in statements {
        assert_eq!(s["Effect"], "Allow", "only Allow statements: {s}");
        assert!(s.get("NotAction").is_none(), "no NotAction: {s}");
        let list: Vec<&str> = match &s["Action"] {
            Value::String(a) => vec![a.as_str()],
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().expect("action string"))
                .collect(),
            other => panic!("Action must be a string or a list: {other}"),
        };
        for a in list {
            assert!(!a.contains('*'), "no wildcard actions: {a}");
            let name = a
                .strip_prefix("ec2:")
                .unwrap_or_else(|| panic!("only EC2 actions: {a}"));
            assert!(actions.insert(name.to_string()), "{a} granted twice");
        }
    }
    actions
}

#[test]
fn scanner_finds_chained_calls() {
    let src = "self.client\n    .stop_instances()\n    .instance_ids(x);\n\
               // self.client.reboot_instances()\n\
               let c = self.client.describe_instances( );\n\
               other_client.terminate_instances();";
    let found: Vec<String> = sdk_operations(src).into_iter().collect();
    assert_eq!(found, vec!["DescribeInstances", "StopInstances"]);
}

#[test]
fn policy_grants_exactly_the_actions_the_code_calls() {
    let declared: BTreeSet<String> = EC2_ACTIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        declared.len(),
        EC2_ACTIONS.len(),
        "EC2_ACTIONS has duplicates"
    );

    let called = sdk_operations(&repo_file("agent/src/aws/ec2.rs"));
    assert_eq!(
        called, declared,
        "the SDK operations called in agent/src/aws/ec2.rs must be EC2_ACTIONS"
    );

    let policy: Value = serde_json::from_str(&repo_file("deploy/aws/iam-policy.json"))
        .expect("deploy/aws/iam-policy.json is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let granted = policy_actions(&policy);
    assert_eq!(
        granted, declared,
        "deploy/aws/iam-policy.json must grant exactly EC2_ACTIONS"
    );
}

#[test]
fn only_describe_is_unrestricted() {
    let policy: Value = serde_json::from_str(&repo_file("deploy/aws/iam-policy.json")).unwrap();
    for s in policy["Statement"].as_array().unwrap() {
        let resources: Vec<&str> = match &s["Resource"] {
            Value::String(r) => vec![r.as_str()],
            Value::Array(r) => r.iter().filter_map(Value::as_str).collect(),
            other => panic!("Resource must be a string or a list: {other}"),
        };
        if resources.contains(&"*") {
            let actions = s["Action"].to_string();
            assert!(
                actions.contains("ec2:Describe") && !actions.contains(','),
                "only Describe* may apply to every resource: {s}"
            );
        } else {
            let tag = &s["Condition"]["StringEquals"]["ec2:ResourceTag/pgwarden:cluster"];
            assert!(
                tag.is_string(),
                "restricted to the cluster's tagged resources: {s}"
            );
        }
    }
}
