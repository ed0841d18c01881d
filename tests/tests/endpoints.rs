//! Client endpoints follow the primary: the local VIP (a client in its own namespace writes
//! through it during switchover, stop-node and partition), the EC2 secondary private IP,
//! Elastic IP and route-table IP (against the EC2 emulator through the real aws-sdk-ec2
//! client), and fencing of a primary that did not step down.

use pgwarden_lab::Fault;
use pgwarden_tests::{spec, workspace_bin, TestLab};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The nodes whose `eth0` carries `ip` (read with `ip -n`, no traffic).
fn holders(t: &TestLab, ip: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in t.lab.nodes.iter().filter(|n| !n.witness) {
        let Some(ns) = &n.netns else { continue };
        let o = std::process::Command::new("ip")
            .args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .expect("ip addr");
        if String::from_utf8_lossy(&o.stdout).contains(&format!(" {ip}/")) {
            out.push(n.name.clone());
        }
    }
    out
}

async fn wait_holders(t: &TestLab, ip: &str, want: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let h = holders(t, ip);
        if h == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ip} is on {h:?}, expected exactly {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write probe in the `client` host, writing through the VIP and naming the server that
/// answered each write.
struct ClientProbe(std::process::Child);

impl ClientProbe {
    fn start(t: &TestLab, vip: &str) -> ClientProbe {
        let dsn = format!(
            "postgresql://postgres:{}@{vip}:5432/postgres?connect_timeout=1",
            t.lab.superuser_password
        );
        let argv: Vec<String> = vec![
            workspace_bin("pgwarden-probe").display().to_string(),
            "--target".into(),
            format!("vip={dsn}"),
            "--identify".into(),
            "--interval-ms".into(),
            "50".into(),
            "--seconds".into(),
            "600".into(),
        ];
        let child = t
            .lab
            .exec("client", &argv)
            .expect("exec client")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start the probe in the client host");
        ClientProbe(child)
    }

    /// Stops the probe (SIGTERM to the PID this test started) and returns its report.
    fn finish(mut self) -> Value {
        let pid = self.0.id() as i32;
        // SAFETY: kill(2) on the PID of the child this test spawned.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let mut out = String::new();
        use std::io::Read;
        if let Some(mut s) = self.0.stdout.take() {
            s.read_to_string(&mut out).expect("read the probe's report");
        }
        let st = self.0.wait().expect("wait for the probe");
        assert!(st.success(), "the client probe failed: {out}");
        serde_json::from_str(&out).expect("probe report")
    }
}

impl Drop for ClientProbe {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_the_primary_through_the_vip_across_switchover_stop_and_partition() {
    let mut s = spec(35, 3);
    let vip_ip = "10.77.135.100";
    s.vip = Some(format!("{vip_ip}/24"));
    let mut t = TestLab::up(s).await;
    // Synchronous mode: every acknowledged write must survive the failovers too.
    let (code, v) = t
        .patch_config("n1", json!({"synchronous_mode": "on"}))
        .await;
    assert_eq!(code, 200, "{v}");
    wait_holders(&t, vip_ip, &["n1"], Duration::from_secs(10)).await;
    t.wait_streaming_from("n1", Duration::from_secs(60)).await;
    let probe = ClientProbe::start(&t, vip_ip);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut order = vec!["n1".to_string()];

    // Switchover.
    let msg = t
        .op("n1", "/v1/switchover", Some(json!({"candidate": "n2"})))
        .await;
    assert!(msg.contains("n2"), "{msg}");
    wait_holders(&t, vip_ip, &["n2"], Duration::from_secs(10)).await;
    order.push("n2".into());
    t.wait_streaming_from("n2", Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The primary's host stops.
    t.lab.fault(Fault::StopNode, "n2").unwrap();
    let p = t.wait_new_primary("n2", Duration::from_secs(30)).await;
    wait_holders(&t, vip_ip, &[p.as_str()], Duration::from_secs(10)).await;
    order.push(p.clone());
    t.lab.fault(Fault::StartNode, "n2").unwrap();
    t.wait_streaming_from(&p, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The primary's host is cut off: the survivors elect a new primary, the VIP moves, and
    // after the partition heals exactly one host carries it.
    t.lab.fault(Fault::Partition, &p).unwrap();
    let q = t.wait_new_primary(&p, Duration::from_secs(30)).await;
    order.push(q.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.lab.fault(Fault::Heal, &p).unwrap();
    wait_holders(&t, vip_ip, &[q.as_str()], Duration::from_secs(10)).await;
    t.wait_streaming_from(&q, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let r = probe.finish();
    eprintln!("client through the VIP: {r}");
    let switches: Vec<String> = r["switches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        switches, order,
        "the VIP led to each primary in turn, never back to an old one: {r}"
    );
    assert_eq!(r["lost_acknowledged"], 0, "{r}");
    assert!(r["acknowledged"].as_u64().unwrap() > 100, "{r}");

    // Drift: the VIP removed by hand comes back within a loop.
    let ns = t.lab.node(&q).unwrap().netns.clone().unwrap();
    let o = std::process::Command::new("ip")
        .args([
            "-n",
            &ns,
            "addr",
            "del",
            &format!("{vip_ip}/24"),
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(holders(&t, vip_ip).is_empty());
    wait_holders(&t, vip_ip, &[q.as_str()], Duration::from_secs(3)).await;
    // The event follows the gratuitous ARP announcements (3 × 100 ms).
    let added = || {
        t.events(&q)
            .iter()
            .filter(|e| e["kind"] == "address_added")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while added() < 2 {
        assert!(
            Instant::now() < deadline,
            "the repair is an event: {}",
            added()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A lab with the EC2 emulator and `fencing`.
async fn ec2_lab(id: u8, nodes: usize, fencing: &str) -> TestLab {
    let mut s = spec(id, nodes);
    s.ec2 = true;
    s.fencing = fencing.into();
    TestLab::up(s).await
}

/// The emulator's control API.
async fn fixture(t: &TestLab, path: &str, body: Option<Value>) -> Value {
    let e = t.lab.ec2.as_ref().expect("ec2 lab");
    let http = reqwest::Client::new();
    let url = format!("{}{path}", e.endpoint);
    let r = match body {
        Some(b) => http.post(url).json(&b).send().await,
        None => http.get(url).send().await,
    }
    .expect("emulator");
    r.json().await.unwrap_or(Value::Null)
}

/// Waits until the emulator shows every endpoint on `node`'s ENI and on no other.
async fn wait_ec2_on(t: &TestLab, node: &str, timeout: Duration) -> Value {
    let e = t.lab.ec2.clone().expect("ec2 lab");
    let eni = e.eni_id(node).unwrap();
    let vip_ip = t.lab.vip_ip().unwrap().to_string();
    let deadline = Instant::now() + timeout;
    loop {
        let st = fixture(t, "/fixture/state", None).await;
        let on: Vec<String> = st["enis"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| {
                        v["private_ips"]
                            .as_array()
                            .is_some_and(|ips| ips.iter().any(|i| i == vip_ip.as_str()))
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let eip_ok = st["elastic_ip"]["eni_id"] == eni.as_str()
            && st["elastic_ip"]["private_ip"] == vip_ip.as_str();
        let rtb = e.world["route_table_id"].as_str().unwrap();
        let route_ok = st["routes"][rtb].as_array().is_some_and(|r| {
            r.iter().any(|x| {
                x["destination"] == format!("{}/32", e.overlay_ip) && x["eni_id"] == eni.as_str()
            })
        });
        if on == [eni.clone()] && eip_ok && route_ok {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "EC2 endpoints not (only) on {node} ({eni}): secondary IP on {on:?}, state {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn calls(v: &Value, action: &str) -> Vec<Value> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["action"] == action && c["dry_run"] != true)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_endpoints_follow_the_primary_and_a_partitioned_primary_is_fenced_first() {
    let mut t = ec2_lab(37, 3, "stop").await;
    let e = t.lab.ec2.clone().unwrap();
    let vip_ip = t.lab.vip_ip().unwrap().to_string();
    // `pgwarden-lab up --ec2` describes the emulated world.
    let d = t.lab.describe(false).await;
    assert_eq!(d["ec2"]["endpoint"], "http://10.77.137.1:5000", "{d}");
    assert_eq!(
        d["ec2"]["nodes"]["n2"]["instance_id"].as_str(),
        e.instance_id("n2").as_deref()
    );
    assert!(d["ec2"]["nodes"]["n2"]["eni_id"]
        .as_str()
        .unwrap()
        .starts_with("eni-"));
    assert_eq!(e.overlay_ip, "10.77.137.250");
    wait_ec2_on(&t, "n1", Duration::from_secs(20)).await;
    wait_holders(&t, &vip_ip, &["n1"], Duration::from_secs(10)).await;
    wait_holders(&t, &e.overlay_ip, &["n1"], Duration::from_secs(10)).await;
    // Every node found itself through its metadata responder and may take over.
    for n in ["n1", "n2", "n3"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ep = t.status(n).await.and_then(|s| s.endpoints);
            if let Some(ep) = &ep {
                if ep.ready {
                    let p = ep.placement.as_ref().unwrap();
                    assert_eq!(Some(p.instance_id.clone()), e.instance_id(n));
                    assert_eq!(Some(p.eni_id.clone()), e.eni_id(n));
                    assert!(ep.permissions.iter().all(|p| p.allowed), "{ep:?}");
                    assert!(
                        ep.permissions.iter().any(|p| p.action == "StopInstances"),
                        "fencing permission checked: {ep:?}"
                    );
                    break;
                }
            }
            assert!(Instant::now() < deadline, "{n} not ready: {ep:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // A switchover moves everything and fences nobody.
    t.op("n1", "/v1/switchover", Some(json!({"candidate": "n2"})))
        .await;
    wait_ec2_on(&t, "n2", Duration::from_secs(20)).await;
    wait_holders(&t, &vip_ip, &["n2"], Duration::from_secs(10)).await;
    let log = fixture(&t, "/fixture/calls", None).await;
    assert!(
        calls(&log, "StopInstances").is_empty(),
        "no fencing on a switchover"
    );
    t.wait_streaming_from("n2", Duration::from_secs(90)).await;

    // No steady-state polling: nothing is described while nothing happens.
    let before = fixture(&t, "/fixture/calls", None).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = fixture(&t, "/fixture/calls", None).await;
    let describes = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["action"].as_str().unwrap_or("").starts_with("Describe"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        describes(&before),
        describes(&after),
        "Describe calls in steady state"
    );

    // The primary is cut off without stepping down: the new primary fences it (the emulator
    // stops its instance, and the lab really stops that host) before it accepts a write.
    t.lab.fault(Fault::Partition, "n2").unwrap();
    let t0 = Instant::now();
    let p = t.wait_new_primary("n2", Duration::from_secs(60)).await;
    let writable = t0.elapsed();
    let st = wait_ec2_on(&t, &p, Duration::from_secs(20)).await;
    eprintln!(
        "fenced failover: {p} writable {} ms after n2 was cut off, EC2 endpoints on it after {} ms",
        writable.as_millis(),
        t0.elapsed().as_millis()
    );
    let n2_instance = e.instance_id("n2").unwrap();
    assert_eq!(st["instances"][&n2_instance]["state"], "stopped", "{st}");
    let log = fixture(&t, "/fixture/calls", None).await;
    let stops = calls(&log, "StopInstances");
    assert_eq!(stops.len(), 1, "{stops:?}");
    let history: pgwarden_core::record::History =
        serde_json::from_value(t.api_get(&p, "/v1/history").await).unwrap();
    let rec = history.failovers.last().unwrap().clone();
    assert_eq!(rec.old_holder.as_deref(), Some("n2"));
    let at = |step: &str| {
        rec.steps
            .iter()
            .find(|s| s.step == step)
            .map(|s| s.at_ms)
            .unwrap_or_else(|| panic!("no step {step} in {rec:?}"))
    };
    let fenced = at("fenced");
    let first_write = at("first_write_accepted");
    assert!(
        fenced <= at("promoted") && fenced <= first_write,
        "fenced before the promotion and the first write: {rec:?}"
    );
    let stop_call = stops[0]["ts_ms"].as_u64().unwrap();
    assert!(stop_call <= first_write, "{stop_call} vs {first_write}");
    for step in [
        "secondary_ip_assigned",
        "elastic_ip_associated",
        "route_replaced",
    ] {
        assert!(
            at(step) >= at("promoted"),
            "{step} after the promotion: {rec:?}"
        );
    }
    assert!(t.event_kinds(&p).iter().any(|k| k == "fenced"));

    // The instance comes back (started by hand): the node rejoins as a replica.
    fixture(
        &t,
        &format!("/fixture/instances/{n2_instance}/state"),
        Some(json!({"state": "running"})),
    )
    .await;
    t.lab.fault(Fault::Heal, "n2").unwrap();
    t.lab.fault(Fault::StartNode, "n2").unwrap();
    t.wait_streaming_from(&p, Duration::from_secs(120)).await;
    wait_holders(&t, &vip_ip, &[p.as_str()], Duration::from_secs(10)).await;
    wait_ec2_on(&t, &p, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_throttling_is_retried_and_a_denied_action_is_named() {
    let mut t = ec2_lab(38, 3, "none").await;
    wait_ec2_on(&t, "n1", Duration::from_secs(20)).await;
    t.wait_streaming_from("n1", Duration::from_secs(60)).await;
    // The next assignments are throttled; the Elastic IP may not be moved at all.
    fixture(
        &t,
        "/fixture/faults",
        Some(json!({"action": "AssignPrivateIpAddresses", "throttle": 2})),
    )
    .await;
    fixture(
        &t,
        "/fixture/faults",
        Some(json!({"action": "AssociateAddress", "deny": true})),
    )
    .await;
    t.op("n1", "/v1/switchover", Some(json!({"candidate": "n3"})))
        .await;
    let e = t.lab.ec2.clone().unwrap();
    let eni3 = e.eni_id("n3").unwrap();
    let vip_ip = t.lab.vip_ip().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = fixture(&t, "/fixture/state", None).await;
        let on3 = st["enis"][&eni3]["private_ips"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i == vip_ip.as_str()));
        if on3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary IP never reached n3: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = fixture(&t, "/fixture/calls", None).await;
    let assigns: Vec<Value> = calls(&log, "AssignPrivateIpAddresses")
        .into_iter()
        .filter(|c| {
            c["params"]["NetworkInterfaceId"] == eni3.as_str()
                && c["params"]["PrivateIpAddress.1"] == vip_ip.as_str()
        })
        .collect();
    assert!(
        assigns.len() >= 3 && assigns[0]["result"] == "RequestLimitExceeded",
        "throttled twice, then retried: {assigns:?}"
    );
    // The denied action is named in the events and the status, and nothing crashed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ep = t.status("n3").await.and_then(|s| s.endpoints).unwrap();
        if ep
            .problems
            .iter()
            .any(|p| p.contains("ec2:AssociateAddress"))
        {
            assert!(t.primaries().await == vec!["n3".to_string()]);
            break;
        }
        assert!(Instant::now() < deadline, "denied action not named: {ep:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = t.events("n3");
    assert!(
        events.iter().any(|e| e["kind"] == "ec2_error"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("ec2:AssociateAddress")),
        "{events:?}"
    );
    // A restarted agent checks its permissions with DryRun and reports itself not ready.
    t.lab.fault(Fault::KillAgent, "n2").unwrap();
    t.lab.start_agent("n2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(ep) = t.status("n2").await.and_then(|s| s.endpoints) {
            if ep
                .permissions
                .iter()
                .any(|p| p.action == "AssociateAddress" && !p.allowed)
            {
                assert!(!ep.ready, "{ep:?}");
                assert!(
                    ep.permissions
                        .iter()
                        .filter(|p| p.action != "AssociateAddress")
                        .all(|p| p.allowed),
                    "{ep:?}"
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "n2 never reported the denied action"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Once allowed again, the Elastic IP follows at the next promotion.
    fixture(&t, "/fixture/faults/clear", Some(json!({}))).await;
    t.op("n3", "/v1/switchover", Some(json!({"candidate": "n1"})))
        .await;
    wait_ec2_on(&t, "n1", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_ec2_fencing_fail_over_after_the_peer_is_seen_stopped() {
    let mut t = ec2_lab(39, 2, "stop").await;
    let e = t.lab.ec2.clone().unwrap();
    let vip_ip = t.lab.vip_ip().unwrap().to_string();
    wait_ec2_on(&t, "n1", Duration::from_secs(20)).await;
    t.exec("n1", "CREATE TABLE arb (x int)").await.unwrap();
    // Both members reported their instances to the group before one is lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    while t
        .status("n2")
        .await
        .and_then(|s| s.endpoints)
        .is_none_or(|ep| !ep.ready)
    {
        assert!(Instant::now() < deadline, "n2 never ready to take over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // n1's host dies; its instance still looks `running` to EC2. Nothing can be committed
    // with one of two voters: n2 stops n1's instance, sees it stopped, and only then promotes.
    t.lab.fault(Fault::StopNode, "n1").unwrap();
    let t0 = Instant::now();
    let p = t.wait_new_primary("n1", Duration::from_secs(60)).await;
    assert_eq!(p, "n2");
    eprintln!(
        "two-node fencing arbiter: n2 writable {} ms after n1 stopped",
        t0.elapsed().as_millis()
    );
    let st = fixture(&t, "/fixture/state", None).await;
    let n1_instance = e.instance_id("n1").unwrap();
    assert_eq!(st["instances"][&n1_instance]["state"], "stopped", "{st}");
    let kinds = t.event_kinds("n2");
    let pos = |k: &str| kinds.iter().position(|x| x == k);
    let (fenced, held, promoted) = (pos("fenced"), pos("lease_arbiter"), pos("promoted"));
    assert!(
        fenced.is_some() && fenced < held && held < promoted,
        "fenced, then held on the arbiter, then promoted: {kinds:?}"
    );
    wait_ec2_on(&t, "n2", Duration::from_secs(20)).await;
    wait_holders(&t, &vip_ip, &["n2"], Duration::from_secs(10)).await;
    t.exec("n2", "INSERT INTO arb VALUES (42)").await.unwrap();

    // n1 is started again: it does not take the lease with its older data; n2 commits its
    // lease in the group and n1 follows it, with n2's writes.
    fixture(
        &t,
        &format!("/fixture/instances/{n1_instance}/state"),
        Some(json!({"state": "running"})),
    )
    .await;
    t.lab.fault(Fault::StartNode, "n1").unwrap();
    t.wait_streaming_from("n2", Duration::from_secs(120)).await;
    assert_eq!(t.primaries().await, vec!["n2".to_string()]);
    t.wait_count("n1", "SELECT count(*) FROM arb WHERE x = 42", 1)
        .await;
    let history: pgwarden_core::record::History =
        serde_json::from_value(t.api_get("n2", "/v1/history").await).unwrap();
    let rec = history.failovers.last().unwrap();
    assert_eq!(rec.new_holder, "n2");
    assert!(
        rec.steps
            .iter()
            .any(|s| s.step == "fenced" && s.detail.contains("arbiter")),
        "{rec:?}"
    );
}
