//! The `pgwarden-lab` command as a user runs it: `up` prints the cluster as JSON, `status`,
//! `exec` inside a host, a fault, `down`.

use pgwarden_tests::{in_ci, workspace_bin};
use std::process::Command;

fn lab(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("pgwarden-lab"))
        .args(["--name", "tcli", "--dir", "/var/tmp/pgwarden-test/tcli"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn up_status_exec_fault_down() {
    assert!(pgwarden_lab::is_root() || !in_ci(), "CI runs as root");
    let _ = lab(&["down"]);
    let mut args = vec![
        "up",
        "--nodes",
        "2",
        "--subnet",
        "10.77.121.0/24",
        "--base-port",
        "28100",
    ];
    if !pgwarden_lab::is_root() {
        args.push("--loopback");
    }
    let (code, out, err) = lab(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("up prints JSON");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
    for key in [
        "name",
        "host",
        "dsn",
        "health_url",
        "api_url",
        "role",
        "state",
    ] {
        assert!(!v["nodes"][0][key].is_null(), "nodes[0].{key} in {out}");
    }
    assert_eq!(v["nodes"][0]["role"], "primary");
    assert_eq!(v["nodes"][1]["role"], "replica");
    assert!(v["token"].as_str().unwrap().len() >= 16);

    let (code, out, _) = lab(&["status"]);
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["nodes"][1]["upstream"], "n1");

    let (code, out, err) = lab(&[
        "exec",
        "n2",
        "--",
        "psql",
        "-Atc",
        "SELECT pg_is_in_recovery()",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "t");
    let (code, _, _) = lab(&["exec", "n2", "--", "false"]);
    assert_eq!(code, 1, "exec passes the command's exit status on");

    let (code, _, err) = lab(&["fault", "kill-postgres", "n1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = lab(&["fault", "explode", "n1"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown fault"), "{err}");

    let (code, _, err) = lab(&["down"]);
    assert_eq!(code, 0, "{err}");
    assert!(!std::path::Path::new("/var/tmp/pgwarden-test/tcli").exists());
    let (code, _, _) = lab(&["status"]);
    assert_ne!(code, 0, "no lab after down");
}
