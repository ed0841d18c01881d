//! `pgwarden-agent --check-config`: a wrong key, type or duration is named with its file and
//! line, and the process exits 2; the shipped example is valid.

use pgwarden_tests::{agent_bin, run};
use std::path::PathBuf;

fn example() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml");
    std::fs::read_to_string(p).expect("read deploy/examples/agent.toml")
}

fn check(name: &str, text: &str) -> (i32, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pgwarden-config-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "0123456789abcdef0123\n").unwrap();
    std::fs::write(dir.join("pw"), "secret\n").unwrap();
    let text = text
        .replace(
            "/etc/pgwarden/api-token",
            &dir.join("token").to_string_lossy(),
        )
        .replace(
            "/etc/pgwarden/superuser-password",
            &dir.join("pw").to_string_lossy(),
        )
        .replace(
            "/etc/pgwarden/replication-password",
            &dir.join("pw").to_string_lossy(),
        );
    // The [tls] files only have to exist for --check-config.
    let text = [
        "/etc/pgwarden/ca.pem",
        "/etc/pgwarden/tls/pg1.pem",
        "/etc/pgwarden/tls/pg1.key",
    ]
    .iter()
    .fold(text, |t, p| t.replace(p, &dir.join("pw").to_string_lossy()));
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = run(
        &agent_bin(),
        &["--config", &f.to_string_lossy(), "--check-config"],
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        code,
        format!("{out}{err}").replace(&f.to_string_lossy().to_string(), name),
    )
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .unwrap()
        + 1
}

#[test]
fn the_shipped_example_is_valid() {
    let (code, out) = check("agent.toml", &example());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn unknown_key_is_named_with_file_and_line() {
    let text = example().replace("loop_wait = \"1s\"", "loop_wiat = \"1s\"");
    let line = line_of(&text, "loop_wiat");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("agent.toml:{line}:")), "{out}");
    assert!(out.contains("loop_wiat"), "{out}");
}

#[test]
fn wrong_type_is_named_with_key_and_line() {
    let text = example().replace("max_connections = 200", "max_connections = [1]");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    let line = line_of(&text, "max_connections");
    assert!(out.contains(&format!("agent.toml:{line}:")), "{out}");
    assert!(
        out.contains("postgresql.parameters.max_connections"),
        "{out}"
    );

    let text = example().replace(
        "name = \"pg2\"\nhost = \"10.0.1.12\"",
        "name = \"pg2\"\nhost = \"10.0.1.12\"\npg_port = \"five\"",
    );
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("agent.toml:{}:", line_of(&text, "pg_port"))),
        "{out}"
    );
    assert!(out.contains("cluster.members.pg_port"), "{out}");
}

#[test]
fn bad_duration_is_named() {
    let text = example().replace("start_timeout = \"60s\"", "start_timeout = \"a minute\"");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("agent.toml:{}:", line_of(&text, "start_timeout"))),
        "{out}"
    );
    assert!(out.contains("postgresql.start_timeout"), "{out}");
    assert!(out.contains("invalid duration"), "{out}");
}

#[test]
fn semantic_errors_and_missing_files_are_named() {
    let text = example().replace("initial_primary = \"pg1\"", "initial_primary = \"pg9\"");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cluster.initial_primary"), "{out}");
    assert!(out.contains("pg1, pg2, pg3"), "{out}");

    let text = example().replace("/etc/pgwarden/api-token", "/nonexistent/token");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("api.token_file") && out.contains("/nonexistent/token"),
        "{out}"
    );

    // A [tls] file that is not there is named with its key (checked after the substitution,
    // so point one at a path that cannot exist).
    let text = example().replace("/etc/pgwarden/tls/pg1.key", "/nonexistent/pg1.key");
    let (code, out) = check("agent.toml", &text);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("tls.key_file") && out.contains("/nonexistent/pg1.key"),
        "{out}"
    );

    let (code, out, err) = run(
        &agent_bin(),
        &["--config", "/nonexistent/agent.toml", "--check-config"],
    )
    .unwrap();
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}
