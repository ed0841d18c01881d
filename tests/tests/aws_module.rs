//! The agent's AWS module (`pgwarden_agent::aws`) with the real aws-sdk-ec2 client against
//! the local EC2 emulator (`tests/fixtures/ec2/emulator.py`, moto made faithful to AWS) and
//! its per-node IMDSv2 responders, all on 127.0.0.1. Credentials come from the instance
//! role through the IMDS responder, as on EC2: the test process clears the AWS_* variables
//! that would otherwise take precedence.
//!
//! Needs the Python venv made by `scripts/install-deps.sh` (`$PGWARDEN_VENV`, default
//! `/var/tmp/pgwarden-venv`); without it the tests are skipped, except in CI where they fail.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use pgwarden_agent::aws::{AwsError, Ec2, Identity, Imds, EC2_ACTIONS};
use pgwarden_core::config::{AwsSection, Fencing};
use pgwarden_core::duration::ConfDuration;
use pgwarden_tests::in_ci;
use serde_json::{json, Value};

const STOP_DELAY_MS: u64 = 1500;
const SECONDARY_IP: &str = "10.77.0.100";
const OVERLAY_IP: &str = "192.168.77.1";

/// The emulator process of one test, stopped (by PID) when the test ends, however it ends.
struct Emulator {
    child: Child,
    dir: PathBuf,
    out: Value,
    http: reqwest::Client,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn venv_python() -> PathBuf {
    let venv = std::env::var("PGWARDEN_VENV").unwrap_or_else(|_| "/var/tmp/pgwarden-venv".into());
    PathBuf::from(venv).join("bin/python")
}

fn fixture_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ec2/emulator.py")
}

/// The credential chain must reach the IMDS responder: nothing from the environment or a
/// developer's ~/.aws may come first. Done once, before any test thread reads the variables.
fn isolate_environment() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                std::env::remove_var(&k);
            }
        }
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/pgwarden-test/config");
        std::env::set_var(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/pgwarden-test/credentials",
        );
    });
}

/// Starts an emulator with nodes n1..n3, or None (skipped) when moto is not installed here.
async fn emulator(test: &str) -> Option<Emulator> {
    isolate_environment();
    let python = venv_python();
    let has_moto = Command::new(&python)
        .args(["-c", "import moto"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_moto {
        let msg = format!(
            "{test}: no moto in {} (run scripts/install-deps.sh)",
            python.display()
        );
        if in_ci() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED {msg}");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("pgwarden-aws-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<Value> = (1..=3)
        .map(|i| json!({"name": format!("n{i}"), "private_ip": format!("10.77.0.{}", 9 + i), "imds_listen": "127.0.0.1:0"}))
        .collect();
    let world = json!({
        "region": "us-east-1", "availability_zone": "us-east-1a",
        "vpc_cidr": "10.77.0.0/16", "subnet_cidr": "10.77.0.0/24",
        "nodes": nodes, "elastic_ip": true, "route_table": true,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    let out_path = dir.join("state.json");
    let log = std::fs::File::create(dir.join("emulator.log")).unwrap();
    let child = Command::new(&python)
        .arg(fixture_script())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--stop-delay-ms",
            &STOP_DELAY_MS.to_string(),
        ])
        .arg("--world")
        .arg(dir.join("world.json"))
        .arg("--out")
        .arg(&out_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the EC2 emulator");
    let mut emu = Emulator {
        child,
        dir: dir.clone(),
        out: Value::Null,
        http: reqwest::Client::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(text) = std::fs::read_to_string(&out_path) {
            emu.out = serde_json::from_str(&text).unwrap();
            return Some(emu);
        }
        if let Ok(Some(status)) = emu.child.try_wait() {
            let log = std::fs::read_to_string(dir.join("emulator.log")).unwrap_or_default();
            panic!("the EC2 emulator exited ({status}):\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "the EC2 emulator did not start within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Emulator {
    fn endpoint(&self) -> &str {
        self.out["endpoint"].as_str().unwrap()
    }
    fn node(&self, name: &str) -> &Value {
        &self.out["nodes"][name]
    }
    fn s(&self, v: &Value) -> String {
        v.as_str()
            .unwrap_or_else(|| panic!("{v} is not a string"))
            .to_string()
    }
    fn eni(&self, node: &str) -> String {
        self.s(&self.node(node)["eni_id"])
    }
    fn instance(&self, node: &str) -> String {
        self.s(&self.node(node)["instance_id"])
    }
    fn imds(&self, node: &str) -> String {
        self.s(&self.node(node)["imds"])
    }

    /// The `[aws]` section of node `node`: everything configured, fencing as given.
    fn section(&self, node: &str, fencing: Fencing) -> AwsSection {
        AwsSection {
            region: Some("us-east-1".into()),
            endpoint_url: Some(self.endpoint().into()),
            metadata_endpoint: Some(self.imds(node)),
            instance_id: None,
            eni_id: None,
            interface: "eth0".into(),
            secondary_ip: Some(SECONDARY_IP.into()),
            elastic_ip_allocation_id: Some(self.s(&self.out["allocation_id"])),
            route_tables: vec![self.s(&self.out["route_table_id"])],
            overlay_ip: Some(OVERLAY_IP.into()),
            fencing,
            fencing_timeout: ConfDuration::secs(30),
            permission_check_interval: ConfDuration::secs(900),
        }
    }

    async fn ec2(&self, node: &str) -> Ec2 {
        Ec2::new(&self.section(node, Fencing::Stop), "us-east-1").await
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.endpoint());
        let resp = self.http.get(&url).send().await.unwrap();
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.endpoint());
        let resp = self.http.post(&url).json(&body).send().await.unwrap();
        assert!(resp.status().is_success(), "POST {url}: {}", resp.status());
        resp.json().await.unwrap()
    }

    async fn state(&self) -> Value {
        self.get("/fixture/state").await
    }

    /// The EC2 calls the emulator received for `action` (DryRun ones included).
    async fn calls(&self, action: &str) -> Vec<Value> {
        let all = self.get("/fixture/calls").await;
        all.as_array()
            .unwrap()
            .iter()
            .filter(|c| c["action"] == action)
            .cloned()
            .collect()
    }

    async fn imds_calls(&self, node: &str) -> Vec<Value> {
        let all = self.get("/fixture/imds/calls").await;
        all.as_array()
            .unwrap()
            .iter()
            .filter(|c| c["node"] == node)
            .cloned()
            .collect()
    }

    /// The ENIs that hold `ip` now.
    async fn holders(&self, ip: &str) -> Vec<String> {
        let st = self.state().await;
        st["enis"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["private_ips"].as_array().unwrap().iter().any(|a| a == ip))
            .map(|(id, _)| id.clone())
            .collect()
    }

    async fn instance_state(&self, node: &str) -> String {
        let st = self.state().await;
        self.s(&st["instances"][self.instance(node)]["state"])
    }
}

#[tokio::test]
async fn imds_identity_and_overrides() {
    let Some(emu) = emulator("imds_identity").await else {
        return;
    };
    let mut cfg = emu.section("n2", Fencing::None);
    cfg.region = None;
    let me = Imds::new(&emu.imds("n2")).identity(&cfg).await.unwrap();
    let want = Identity {
        instance_id: emu.instance("n2"),
        region: "us-east-1".into(),
        availability_zone: "us-east-1a".into(),
        mac: emu.s(&emu.node("n2")["mac"]),
        eni_id: emu.eni("n2"),
        subnet_id: emu.s(&emu.out["subnet_id"]),
        vpc_id: emu.s(&emu.out["vpc_id"]),
        subnet_cidr: "10.77.0.0/24".into(),
        private_ip: "10.77.0.11".into(),
        vpc_cidr: "10.77.0.0/16".into(),
    };
    assert_eq!(me, want);

    cfg.instance_id = Some("i-0123456789abcdef0".into());
    cfg.region = Some("eu-west-1".into());
    let overridden = Imds::new(&emu.imds("n2")).identity(&cfg).await.unwrap();
    assert_eq!(overridden.instance_id, "i-0123456789abcdef0");
    assert_eq!(overridden.region, "eu-west-1");
    assert_eq!(overridden.eni_id, want.eni_id);

    // Only IMDSv2: a GET without a token is refused, a PUT without a TTL is a bad request.
    let http = reqwest::Client::new();
    let base = emu.imds("n2");
    let plain = http
        .get(format!("{base}/latest/meta-data/instance-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 401);
    let no_ttl = http
        .put(format!("{base}/latest/api/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_ttl.status().as_u16(), 400);
}

#[tokio::test]
async fn imds_token_is_renewed_on_expiry_and_after_401() {
    let Some(emu) = emulator("imds_token").await else {
        return;
    };
    let imds = Imds::new(&emu.imds("n1")).with_token_ttl(Duration::from_secs(1));
    let puts = |calls: &[Value]| calls.iter().filter(|c| c["method"] == "PUT").count();

    assert_eq!(
        imds.get("meta-data/instance-id").await.unwrap(),
        emu.instance("n1")
    );
    assert_eq!(
        imds.get("meta-data/local-ipv4").await.unwrap(),
        "10.77.0.10"
    );
    assert_eq!(
        puts(&emu.imds_calls("n1").await),
        1,
        "one token for both reads"
    );

    // The token lives 1 s: after that the client asks for a new one before reading.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    imds.get("meta-data/instance-id").await.unwrap();
    let calls = emu.imds_calls("n1").await;
    assert_eq!(puts(&calls), 2, "{calls:?}");
    assert!(
        calls.iter().all(|c| c["status"] == 200),
        "no 401 needed: {calls:?}"
    );

    // A token the service no longer accepts (401) is replaced and the read retried.
    let long = Imds::new(&emu.imds("n1"));
    long.get("meta-data/mac").await.unwrap();
    emu.post("/fixture/imds/revoke", json!({})).await;
    assert_eq!(
        long.get("meta-data/instance-id").await.unwrap(),
        emu.instance("n1")
    );
    let calls = emu.imds_calls("n1").await;
    let tail: Vec<(String, u64)> = calls[calls.len() - 3..]
        .iter()
        .map(|c| (emu.s(&c["method"]), c["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        tail,
        vec![
            ("GET".into(), 401),
            ("PUT".into(), 200),
            ("GET".into(), 200)
        ]
    );
}

#[tokio::test]
async fn credentials_come_from_the_instance_role_through_imds() {
    let Some(emu) = emulator("imds_credentials").await else {
        return;
    };
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        assert!(
            std::env::var(k).is_err(),
            "{k} must not be set for this test"
        );
    }
    let ec2 = emu.ec2("n3").await;
    assert_eq!(
        ec2.instance_state(&emu.instance("n1")).await.unwrap(),
        "running"
    );
    let calls = emu.imds_calls("n3").await;
    assert!(
        calls.iter().any(|c| c["path"]
            == "/latest/meta-data/iam/security-credentials/pgwarden-agent"
            && c["status"] == 200),
        "the role's credentials were read from n3's IMDS: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c["method"] == "PUT"),
        "IMDSv2 token: {calls:?}"
    );
}

#[tokio::test]
async fn secondary_ip_moves_with_reassignment_and_unassign_is_idempotent() {
    let Some(emu) = emulator("secondary_ip").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let (n1, n2) = (emu.eni("n1"), emu.eni("n2"));

    ec2.assign_secondary_ip(&n1, SECONDARY_IP).await.unwrap();
    assert_eq!(emu.holders(SECONDARY_IP).await, vec![n1.clone()]);

    ec2.assign_secondary_ip(&n2, SECONDARY_IP).await.unwrap();
    assert_eq!(
        emu.holders(SECONDARY_IP).await,
        vec![n2.clone()],
        "moved: on the new ENI and no longer on the old one"
    );
    let st = emu.state().await;
    assert_eq!(st["enis"][&n1]["private_ips"], json!(["10.77.0.10"]));
    assert_eq!(
        st["enis"][&n2]["private_ips"],
        json!(["10.77.0.11", SECONDARY_IP])
    );
    let assigns = emu.calls("AssignPrivateIpAddresses").await;
    assert!(assigns
        .iter()
        .all(|c| c["params"]["AllowReassignment"] == "true"));

    // Unassigning an address the ENI does not have: EC2 says so, the module shrugs.
    ec2.unassign_secondary_ip(&n1, SECONDARY_IP).await.unwrap();
    let unassigns = emu.calls("UnassignPrivateIpAddresses").await;
    assert_eq!(unassigns.last().unwrap()["result"], "InvalidParameterValue");
    assert_eq!(emu.holders(SECONDARY_IP).await, vec![n2.clone()]);

    ec2.unassign_secondary_ip(&n2, SECONDARY_IP).await.unwrap();
    assert!(emu.holders(SECONDARY_IP).await.is_empty());

    // An address outside the subnet is refused, as by AWS.
    let e = ec2.assign_secondary_ip(&n1, "10.77.9.9").await.unwrap_err();
    assert!(matches!(e, AwsError::Other { .. }), "{e:?}");
    assert!(
        e.to_string().contains("ec2:AssignPrivateIpAddresses"),
        "{e}"
    );
}

#[tokio::test]
async fn elastic_ip_follows_the_new_primary() {
    let Some(emu) = emulator("elastic_ip").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let alloc = emu.s(&emu.out["allocation_id"]);
    let public = emu.s(&emu.out["public_ip"]);
    let (n1, n2) = (emu.eni("n1"), emu.eni("n2"));

    ec2.associate_elastic_ip(&alloc, &n1, "10.77.0.10")
        .await
        .unwrap();
    let st = emu.state().await;
    assert_eq!(st["elastic_ip"]["eni_id"], json!(n1));
    assert_eq!(
        st["instances"][emu.instance("n1")]["public_ip"],
        json!(public)
    );

    // The new primary: secondary IP first, then the Elastic IP onto that address.
    ec2.assign_secondary_ip(&n2, SECONDARY_IP).await.unwrap();
    ec2.associate_elastic_ip(&alloc, &n2, SECONDARY_IP)
        .await
        .unwrap();
    let st = emu.state().await;
    assert_eq!(
        st["elastic_ip"],
        json!({"allocation_id": alloc, "public_ip": public, "eni_id": n2, "private_ip": SECONDARY_IP})
    );
    assert_eq!(
        st["instances"][emu.instance("n1")]["public_ip"],
        Value::Null,
        "nothing stale left on the old primary"
    );
    let last = emu.calls("AssociateAddress").await.pop().unwrap();
    assert_eq!(last["params"]["AllowReassociation"], "true");
    assert_eq!(last["params"]["PrivateIpAddress"], SECONDARY_IP);
}

#[tokio::test]
async fn route_is_created_then_replaced() {
    let Some(emu) = emulator("route").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let rtb = emu.s(&emu.out["route_table_id"]);
    let dest = format!("{OVERLAY_IP}/32");
    let routes = |st: &Value| -> Vec<Value> {
        st["routes"][&rtb]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["destination"] == dest.as_str())
            .cloned()
            .collect()
    };

    ec2.point_route(&rtb, &dest, &emu.eni("n1")).await.unwrap();
    assert_eq!(
        routes(&emu.state().await),
        vec![json!({"destination": dest, "eni_id": emu.eni("n1")})]
    );
    assert_ne!(emu.calls("ReplaceRoute").await[0]["result"], "ok");
    assert_eq!(emu.calls("CreateRoute").await.len(), 1);

    ec2.point_route(&rtb, &dest, &emu.eni("n2")).await.unwrap();
    assert_eq!(
        routes(&emu.state().await),
        vec![json!({"destination": dest, "eni_id": emu.eni("n2")})]
    );
    assert_eq!(
        emu.calls("ReplaceRoute").await.last().unwrap()["result"],
        "ok"
    );
    assert_eq!(
        emu.calls("CreateRoute").await.len(),
        1,
        "no second CreateRoute"
    );
}

#[tokio::test]
async fn fence_stop_waits_for_stopped() {
    let Some(emu) = emulator("fence_stop").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let target = emu.instance("n2");

    let out = ec2
        .fence(&target, Fencing::Stop, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(out.action, "stop");
    assert_eq!(out.final_state, "stopped");
    assert_eq!(out.instance_id, target);
    assert!(
        out.elapsed_ms >= STOP_DELAY_MS,
        "returned after {} ms, before the instance left `stopping`",
        out.elapsed_ms
    );
    assert_eq!(emu.instance_state("n2").await, "stopped");
    let stops = emu.calls("StopInstances").await;
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0]["params"]["Force"], "true");
    assert!(!emu.calls("DescribeInstances").await.is_empty());
    assert!(emu.calls("StartInstances").await.is_empty());

    // Already stopped: fenced at once.
    let again = ec2
        .fence(&target, Fencing::Stop, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(again.final_state, "stopped");
    assert!(again.elapsed_ms < STOP_DELAY_MS);

    // Not stopped within the timeout: an error naming the instance and its last state.
    emu.post(
        &format!("/fixture/instances/{target}/state"),
        json!({"state": "running"}),
    )
    .await;
    let t0 = Instant::now();
    let e = ec2
        .fence(&target, Fencing::Stop, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(STOP_DELAY_MS + 1000));
    let text = e.to_string();
    assert!(matches!(e, AwsError::Other { .. }), "{e:?}");
    assert!(
        text.contains(&target) && text.contains("stopping"),
        "{text}"
    );
}

#[tokio::test]
async fn fence_reboot_starts_the_instance_again() {
    let Some(emu) = emulator("fence_reboot").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let target = emu.instance("n3");
    let out = ec2
        .fence(&target, Fencing::Reboot, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(out.action, "reboot");
    assert_eq!(out.final_state, "pending");
    assert!(out.elapsed_ms >= STOP_DELAY_MS);
    let all = emu.get("/fixture/calls").await;
    let lifecycle: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "StopInstances" || c["action"] == "StartInstances")
        .map(|c| emu.s(&c["action"]))
        .collect();
    assert_eq!(lifecycle, vec!["StopInstances", "StartInstances"]);
    let state = emu.instance_state("n3").await;
    assert!(state == "pending" || state == "running", "{state}");
}

#[tokio::test]
async fn throttling_is_retried_until_it_passes() {
    let Some(emu) = emulator("throttle").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    let alloc = emu.s(&emu.out["allocation_id"]);
    emu.post(
        "/fixture/faults",
        json!({"action": "AssociateAddress", "throttle": 3}),
    )
    .await;
    ec2.associate_elastic_ip(&alloc, &emu.eni("n1"), "10.77.0.10")
        .await
        .unwrap();
    let results: Vec<String> = emu
        .calls("AssociateAddress")
        .await
        .iter()
        .map(|c| emu.s(&c["result"]))
        .collect();
    assert_eq!(
        results,
        vec![
            "RequestLimitExceeded",
            "RequestLimitExceeded",
            "RequestLimitExceeded",
            "ok"
        ]
    );
    assert_eq!(
        emu.state().await["elastic_ip"]["eni_id"],
        json!(emu.eni("n1"))
    );

    // Throttled for longer than the retries last: a Throttled error naming the action.
    emu.post(
        "/fixture/faults",
        json!({"action": "AssociateAddress", "throttle": 50}),
    )
    .await;
    let e = ec2
        .associate_elastic_ip(&alloc, &emu.eni("n2"), "10.77.0.11")
        .await
        .unwrap_err();
    assert!(matches!(e, AwsError::Throttled { .. }), "{e:?}");
    assert!(e.to_string().contains("ec2:AssociateAddress"), "{e}");
    assert_eq!(
        emu.calls("AssociateAddress").await.len(),
        4 + 5,
        "5 attempts"
    );
}

#[tokio::test]
async fn a_denied_action_is_a_permission_error_naming_it() {
    let Some(emu) = emulator("deny").await else {
        return;
    };
    let ec2 = emu.ec2("n1").await;
    emu.post(
        "/fixture/faults",
        json!({"action": "ReplaceRoute", "deny": true}),
    )
    .await;
    let rtb = emu.s(&emu.out["route_table_id"]);
    let e = ec2
        .point_route(&rtb, &format!("{OVERLAY_IP}/32"), &emu.eni("n1"))
        .await
        .unwrap_err();
    assert!(matches!(e, AwsError::Permission { .. }), "{e:?}");
    assert_eq!(e.action(), "ReplaceRoute");
    let text = e.to_string();
    assert!(
        text.starts_with("ec2:ReplaceRoute is not permitted (UnauthorizedOperation)"),
        "{text}"
    );
    assert!(text.contains("deploy/aws/iam-policy.json"), "{text}");
    assert!(
        emu.calls("CreateRoute").await.is_empty(),
        "no fallback on a denial"
    );
    assert_eq!(
        emu.calls("ReplaceRoute").await.len(),
        1,
        "a denial is not retried"
    );
}

#[tokio::test]
async fn permission_check_reports_exactly_the_denied_action() {
    let Some(emu) = emulator("permissions").await else {
        return;
    };
    let cfg = emu.section("n1", Fencing::Reboot);
    let ec2 = Ec2::new(&cfg, "us-east-1").await;
    let me = Imds::new(&emu.imds("n1")).identity(&cfg).await.unwrap();
    let peers = vec![emu.instance("n2"), emu.instance("n3")];
    let before = emu.state().await;

    let all = ec2.check_permissions(&cfg, &me, &peers).await;
    let actions: BTreeSet<&str> = all.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(
        actions,
        EC2_ACTIONS.iter().copied().collect::<BTreeSet<_>>()
    );
    assert!(
        all.iter().all(|c| c.allowed && c.error.is_none()),
        "{all:?}"
    );

    for denied in ["StopInstances", "AssignPrivateIpAddresses"] {
        emu.post("/fixture/faults/clear", json!({})).await;
        emu.post("/fixture/faults", json!({"action": denied, "deny": true}))
            .await;
        let checks = ec2.check_permissions(&cfg, &me, &peers).await;
        let refused: Vec<_> = checks.iter().filter(|c| !c.allowed).collect();
        assert_eq!(refused.len(), 1, "{checks:?}");
        assert_eq!(refused[0].action, denied);
        let error = refused[0].error.clone().unwrap();
        assert!(error.contains(&format!("ec2:{denied}")), "{error}");
    }

    // Checking changed nothing: no address moved, no instance stopped.
    assert_eq!(emu.state().await, before);
    let calls = emu.get("/fixture/calls").await;
    for c in calls.as_array().unwrap() {
        let probe = c["action"] == "AssignPrivateIpAddresses"
            || c["action"] == "UnassignPrivateIpAddresses";
        assert!(
            c["dry_run"] == true || probe,
            "only DryRun calls and no-op probes: {c}"
        );
        assert_ne!(c["result"], "ok", "nothing was done: {c}");
    }
    // Fencing off, no secondary IP: nothing about instances or addresses is checked.
    let mut small = cfg.clone();
    small.fencing = Fencing::None;
    small.secondary_ip = None;
    let checks = ec2.check_permissions(&small, &me, &peers).await;
    let actions: Vec<&str> = checks.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["AssociateAddress", "ReplaceRoute", "CreateRoute"]
    );
}
