//! `pgwardenctl list` against a lab: one row per member with its role, state and timeline;
//! `--json` gives the same data; a missing token is a clear error.

use pgwarden_lab::Fault;
use pgwarden_tests::{spec, workspace_bin, TestLab};

fn ctl(t: &TestLab, args: &[&str], token: bool) -> (i32, String, String) {
    let mut c = std::process::Command::new(workspace_bin("pgwardenctl"));
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
    let out = c.output().unwrap();
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
