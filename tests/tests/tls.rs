//! Mutual TLS on the agents' API: agents talk Raft over HTTPS with certificates from the lab's
//! CA; Raft routes refuse a client without such a certificate; a certificate from another CA
//! does not even get a TLS session; plain HTTP gets nothing; the bearer token is still required
//! for operations.

use pgwarden_tests::{agent_bin, run, spec, TestLab};
use std::time::Duration;

fn client(
    ca: &std::path::Path,
    ident: Option<(&std::path::Path, &std::path::Path)>,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
    if let Some((cert, key)) = ident {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_api_requires_the_installation_ca() {
    let t = TestLab::up(spec(17, 3)).await;
    let tls = t.lab.tls.clone().expect("the lab runs with TLS");
    let base = t.lab.api_url("n1").unwrap();
    assert!(base.starts_with("https://"), "{base}");
    let token = &t.lab.token;

    // The agents formed their group over mutual TLS.
    pgwarden_tests::wait_for(Duration::from_secs(20), "a Raft leader", || async {
        t.status("n1")
            .await
            .and_then(|s| s.consensus)
            .is_some_and(|c| c.leader.is_some())
    })
    .await;

    let operator = client(&tls.ca, Some((&tls.cert, &tls.key)));
    let anonymous = client(&tls.ca, None);
    let vote = format!("{base}/v1/raft/vote");
    let status = format!("{base}/v1/status");

    // Operators: the token is what authorizes, with or without a certificate.
    let r = anonymous
        .get(&status)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = operator.get(&status).send().await.unwrap();
    assert_eq!(r.status(), 401, "a certificate does not replace the token");

    // Raft: only members of the installation (a certificate from its CA).
    let r = anonymous
        .post(&vote)
        .bearer_auth(token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = operator
        .post(&vote)
        .bearer_auth(token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        422,
        "past authentication, refused only for its empty body"
    );

    // A certificate from another CA gets no TLS session at all.
    let other = t.lab.dir.join("other-ca");
    let bin = agent_bin();
    let o = other.to_string_lossy().to_string();
    assert_eq!(run(&bin, &["certs", "init", "--dir", &o]).unwrap().0, 0);
    assert_eq!(
        run(
            &bin,
            &["certs", "issue", "--ca-dir", &o, "--name", "intruder", "--out", &o]
        )
        .unwrap()
        .0,
        0
    );
    let intruder = client(
        &tls.ca,
        Some((&other.join("intruder.pem"), &other.join("intruder.key"))),
    );
    let err = intruder.get(&status).bearer_auth(token).send().await;
    assert!(err.is_err(), "a foreign certificate was accepted: {err:?}");
    // `certs init` never replaces an existing CA.
    let (code, _, e) = run(&bin, &["certs", "init", "--dir", &o]).unwrap();
    assert_eq!(code, 1);
    assert!(e.contains("already holds a CA"), "{e}");

    // Plain HTTP on the API port gets nothing.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let r = plain
        .get(status.replace("https://", "http://"))
        .bearer_auth(token)
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
}
