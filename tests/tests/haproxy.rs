//! HAProxy from Debian with the health-check configuration DBAs use with Patroni
//! (`option httpchk OPTIONS /master`, `check port 8008`) routes clients to the primary, and
//! to the new primary after a switchover.

use pgwarden_tests::{in_ci, spec, sql, wait_for, TestLab};
use serde_json::json;
use std::time::Duration;

struct HaProxy(std::process::Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_routes_to_the_primary_and_follows_a_switchover() {
    let haproxy = std::path::Path::new("/usr/sbin/haproxy");
    if !haproxy.exists() {
        assert!(
            !in_ci(),
            "haproxy must be installed in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: /usr/sbin/haproxy is not installed (apt-get install haproxy)");
        return;
    }
    let t = TestLab::up(spec(11, 3)).await;
    let mut servers = String::new();
    for n in &t.lab.nodes {
        servers.push_str(&format!(
            "    server {} {}:{} check port {}\n",
            n.name, n.host, n.pg_port, n.health_port
        ));
    }
    // The seed's configuration, with local ports.
    let cfg = format!(
        "global
    maxconn 100
defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s
listen production
    bind 127.0.0.1:27432
    option  httpchk OPTIONS /master
    http-check      expect status 200
    default-server inter 2s fastinter 1s rise 2 fall 1 on-marked-down shutdown-sessions
{servers}
listen standby
    bind 127.0.0.1:27433
    option  httpchk OPTIONS /replica
    http-check      expect status 200
    balance roundrobin
    default-server inter 2s fastinter 1s rise 2 fall 1 on-marked-down shutdown-sessions
{servers}"
    );
    let f = t.lab.dir.join("haproxy.cfg");
    std::fs::write(&f, cfg).unwrap();
    let _hp = HaProxy(
        std::process::Command::new(haproxy)
            .args(["-db", "-f"])
            .arg(&f)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(t.lab.dir.join("haproxy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pw = &t.lab.superuser_password;
    let rw = format!("postgresql://postgres:{pw}@127.0.0.1:27432/postgres");
    let ro = format!("postgresql://postgres:{pw}@127.0.0.1:27433/postgres");
    // The PostgreSQL protocol decides, not a TCP connect: HAProxy always accepts.
    let server_of = |dsn: String| async move {
        let r = sql(&dsn, "SELECT inet_server_addr()::text, pg_is_in_recovery()")
            .await
            .ok()?;
        Some((r[0].get::<_, String>(0), r[0].get::<_, bool>(1)))
    };
    let host = |n: &str| format!("{}/32", t.lab.node(n).unwrap().host);
    wait_for(
        Duration::from_secs(30),
        "HAProxy routes writes to n1",
        || async { server_of(rw.clone()).await == Some((host("n1"), false)) },
    )
    .await;
    // HAProxy starts with every server up until its first check: wait for the checks.
    wait_for(
        Duration::from_secs(30),
        "HAProxy routes reads to replicas",
        || async {
            let mut seen = Vec::new();
            for _ in 0..4 {
                seen.push(server_of(ro.clone()).await);
            }
            seen.iter()
                .all(|s| s.as_ref().is_some_and(|(a, rec)| *rec && *a != host("n1")))
        },
    )
    .await;

    t.op("n1", "/v1/switchover", Some(json!({"candidate": "n2"})))
        .await;
    wait_for(
        Duration::from_secs(30),
        "HAProxy routes writes to n2",
        || async { server_of(rw.clone()).await == Some((host("n2"), false)) },
    )
    .await;
    sql(&rw, "CREATE TABLE through_haproxy (id int)")
        .await
        .unwrap();
}
