//! `pgwardenctl list` against a lab: one row per member with its role, state and timeline;
//! `--json` gives the same data; a missing token is a clear error.

use pgwarden_lab::Fault;
use pgwarden_tests::{spec, wait_for, workspace_bin, TestLab};
use std::time::Duration;

fn ctl(t: &TestLab, args: &[&str], token: bool) -> (i32, String, String) {
    ctl_with(t, args, token, &[], "")
}

fn ctl_with(
    t: &TestLab,
    args: &[&str],
    token: bool,
    env: &[(&str, &str)],
    stdin: &str,
) -> (i32, String, String) {
    use std::io::Write;
    let mut c = std::process::Command::new(workspace_bin("pgwardenctl"));
    c.envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c.env_remove("PGWARDEN_TOKEN")
        .arg("--agent")
        .arg(t.lab.api_url("n2").unwrap())
        .args(args);
    if let Some(tls) = &t.lab.tls {
        c.arg("--ca").arg(&tls.ca);
    }
    if token {
        c.env("PGWARDEN_TOKEN", &t.lab.token);
    }
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn row<'a>(table: &'a str, member: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {member} ")))
        .unwrap_or_else(|| panic!("no row for {member}:\n{table}"))
        .split('|')
        .map(str::trim)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_every_member() {
    let mut t = TestLab::up(spec(16, 3)).await;
    // The answering agent reports its peers as of its last poll (one loop at most).
    pgwarden_tests::wait_for(
        std::time::Duration::from_secs(10),
        "n2 sees everyone",
        || async {
            let (_, out, _) = ctl(&t, &["list"], true);
            out.matches("streaming").count() == 2
        },
    )
    .await;
    let (code, out, err) = ctl(&t, &["list"], true);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("+ Cluster: t16 ("), "{out}");
    assert_eq!(row(&out, "n1")[3..6], ["Primary", "running", "1"]);
    for n in ["n2", "n3"] {
        assert_eq!(row(&out, n)[3..6], ["Replica", "streaming", "1"], "{out}");
    }

    t.lab.fault(Fault::StopNode, "n3").unwrap();
    pgwarden_tests::wait_for(
        std::time::Duration::from_secs(15),
        "n3 unreachable",
        || async {
            let (_, out, _) = ctl(&t, &["list"], true);
            row(&out, "n3")[4] == "unreachable"
        },
    )
    .await;

    let (code, out, _) = ctl(&t, &["list", "--json"], true);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cluster"], "t16");
    assert_eq!(v["members"][0]["status"]["role"], "primary");
    assert!(v["members"][2]["status"].is_null());

    let (code, _, err) = ctl(&t, &["list"], false);
    assert_eq!(code, 1);
    assert!(err.contains("token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_edit_config_and_restart_pending() {
    let t = TestLab::up(spec(20, 3)).await;
    let all = ["n1", "n2", "n3"];

    let (code, out, err) = ctl(&t, &["pause"], true);
    assert_eq!(code, 0, "{out}{err}");
    for n in all {
        wait_for(Duration::from_secs(10), &format!("{n} paused"), || async {
            t.status(n)
                .await
                .and_then(|s| s.consensus)
                .is_some_and(|c| c.paused)
        })
        .await;
    }
    let (_, out, _) = ctl(&t, &["list"], true);
    assert!(out.contains("Maintenance mode: on"), "{out}");
    assert_eq!(ctl(&t, &["resume"], true).0, 0);

    let (code, out, _) = ctl(&t, &["show-config"], true);
    assert_eq!(code, 0);
    assert!(
        out.contains("version 0") && out.contains("[parameters]"),
        "{out}"
    );

    // Declined: nothing changes.
    let add = |line: &str| format!("sed -i 's/^\\[parameters\\]$/[parameters]\\n{line}/'");
    let editor = add("work_mem = \"9MB\"");
    let (code, out, _) = ctl_with(&t, &["edit-config"], true, &[("EDITOR", &editor)], "n\n");
    assert_eq!(code, 0);
    assert!(
        out.contains("+work_mem = \"9MB\"") && out.contains("not applied"),
        "{out}"
    );
    let (_, out, _) = ctl(&t, &["show-config"], true);
    assert!(out.contains("version 0"), "{out}");

    // Accepted: every node gets it.
    let (code, out, err) = ctl_with(&t, &["edit-config"], true, &[("EDITOR", &editor)], "y\n");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("version 1 applied"), "{out}");
    for n in all {
        t.wait_text(n, "SHOW work_mem", "9MB").await;
    }

    // A restart-only change, then restart --pending restarts exactly the members that need it.
    let editor = add("max_connections = 45");
    let (code, _, err) = ctl_with(
        &t,
        &["edit-config", "--force"],
        true,
        &[("EDITOR", &editor)],
        "",
    );
    assert_eq!(code, 0, "{err}");
    for n in all {
        wait_for(
            Duration::from_secs(20),
            &format!("pending on {n}"),
            || async { t.status(n).await.is_some_and(|s| s.pending_restart) },
        )
        .await;
    }
    // Let the answering agent's view of its peers catch up (one loop).
    wait_for(
        Duration::from_secs(10),
        "the view shows three pending",
        || async {
            let (_, out, _) = ctl(&t, &["list", "--json"], true);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            v["members"].as_array().is_some_and(|m| {
                m.iter()
                    .filter(|m| m["status"]["pending_restart"] == true)
                    .count()
                    == 3
            })
        },
    )
    .await;
    let (code, out, err) = ctl(&t, &["restart", "--pending"], true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("restarted n1, n2, n3"), "{out}");
    for n in all {
        assert!(!t.status(n).await.unwrap().pending_restart, "{n}");
        let v: String = t.sql(n, "SHOW max_connections").await.unwrap()[0].get(0);
        assert_eq!(v, "45");
    }
    let (code, _, err) = ctl(&t, &["restart", "n9"], true);
    assert_eq!(code, 1);
    assert!(err.contains("n9 is not a member"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_failover_from_the_command_line() {
    let t = TestLab::up(spec(27, 3)).await;
    t.wait_streaming_from("n1", Duration::from_secs(30)).await;
    // Asked, answered no: nothing happens.
    let (code, out, err) = ctl_with(&t, &["switchover", "--candidate", "n3"], true, &[], "n\n");
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("aborted"), "{out}{err}");
    assert_eq!(t.primaries().await, vec!["n1".to_string()]);
    // Answered yes: n3 becomes the primary, the others follow it.
    let (code, out, err) = ctl_with(&t, &["switchover", "--candidate", "n3"], true, &[], "y\n");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("switched over from n1 to n3"), "{out}");
    assert_eq!(t.primaries().await, vec!["n3".to_string()]);
    t.wait_streaming_from("n3", Duration::from_secs(60)).await;
    // A failover while the primary is healthy is refused and says what to use instead.
    let (code, out, err) = ctl(&t, &["failover", "--candidate", "n2", "--force"], true);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("switchover"), "{err}");
    // Scheduled: answered at once, done when due; --json gives the operation result.
    let at = pgwarden_core::timefmt::format_rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 4000,
    );
    let (code, out, err) = ctl(
        &t,
        &[
            "switchover",
            "--candidate",
            "n2",
            "--scheduled",
            &at,
            "--force",
            "--json",
        ],
        true,
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["message"].as_str().unwrap().contains("scheduled"), "{v}");
    assert_eq!(t.primaries().await, vec!["n3".to_string()], "not yet");
    wait_for(
        Duration::from_secs(30),
        "the scheduled switchover ran",
        || async { t.primaries().await == vec!["n2".to_string()] },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "n3 records the scheduled switchover",
        || async { t.event_kinds("n3").contains(&"switchover_done".to_string()) },
    )
    .await;
}
