//! A data directory the agent must not touch: another major version, or not PostgreSQL at all.
//! The agent refuses it, says why in its status and events, and leaves every byte in place.

use pgwarden_core::status::{NodeStatus, PgState};
use pgwarden_tests::agent_bin;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Agent {
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.insert(
            e.file_name().to_string_lossy().to_string(),
            std::fs::read(e.path()).unwrap_or_default(),
        );
    }
    out
}

/// Starts a single-node agent on loopback whose data directory holds `files`.
fn start(name: &str, port: u16, files: &[(&str, &str)]) -> (Agent, PathBuf) {
    let dir = PathBuf::from("/var/tmp/pgwarden-test").join(format!("datadir-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (f, text) in files {
        std::fs::write(data.join(f), text).unwrap();
    }
    let cfg = format!(
        r#"
[node]
name = "solo"
state_dir = "{dir}/state"
loop_wait = "200ms"
[cluster]
name = "c"
initial_primary = "solo"
[[cluster.members]]
name = "solo"
host = "127.0.0.1"
pg_port = {port}
health_port = {hp}
api_port = {ap}
[api]
listen = "127.0.0.1:{ap}"
token = "0123456789abcdef0123"
[health]
listen = "127.0.0.1:{hp}"
[postgresql]
data_dir = "{data}"
socket_dir = "{dir}/run"
superuser_password = "x"
replication_password = "y"
"#,
        dir = dir.display(),
        data = data.display(),
        hp = port + 1,
        ap = port + 2,
    );
    std::fs::write(dir.join("agent.toml"), cfg).unwrap();
    let child = std::process::Command::new(agent_bin())
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    (Agent { child, dir }, data)
}

async fn refused_status(port: u16) -> NodeStatus {
    let url = format!("http://127.0.0.1:{}/status", port + 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            if let Ok(st) = r.json::<NodeStatus>().await {
                if st.state == PgState::Refused {
                    return st;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not refuse the data directory"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn data_directory_of_another_major_version_is_refused_and_untouched() {
    let (agent, data) = start(
        "v12",
        27100,
        &[("PG_VERSION", "12\n"), ("important", "do not lose")],
    );
    let before = snapshot(&data);
    let st = refused_status(27100).await;
    let err = st.last_error.unwrap();
    assert!(err.contains("PostgreSQL 12") && err.contains("15"), "{err}");
    // Give the loop a few more rounds to do something it must not do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshot(&data), before, "the data directory was changed");
    let code = reqwest::get("http://127.0.0.1:27101/health")
        .await
        .unwrap()
        .status();
    assert_eq!(code, 503);
    let events = std::fs::read_to_string(agent.dir.join("state/events.jsonl")).unwrap();
    assert!(events.contains("\"kind\":\"refused\""), "{events}");
}

#[tokio::test]
async fn directory_that_is_not_postgresql_is_refused_and_untouched() {
    let (_agent, data) = start(
        "notpg",
        27200,
        &[("photo.jpg", "\u{1}\u{2}"), ("notes", "x")],
    );
    let before = snapshot(&data);
    let st = refused_status(27200).await;
    assert!(st
        .last_error
        .unwrap()
        .contains("not a PostgreSQL data directory"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshot(&data), before);
    assert!(!data.join("PG_VERSION").exists(), "no initdb ran over it");
}
