//! The guard: a tiny process the agent starts and that outlives it. PostgreSQL keeps running
//! when the agent stops (so an agent restart or upgrade causes no failover), which means a
//! dead agent cannot stop its primary when the lease runs out. The guard does: every 100 ms it
//! reads the lease deadline the agent writes to `<state_dir>/lease.deadline` (CLOCK_MONOTONIC
//! milliseconds, 0 for none) and stops a writable PostgreSQL (immediate shutdown) once the
//! deadline has passed. It exits when neither the agent nor PostgreSQL runs any more, or when
//! a newer guard replaced it.
//!
//! What it cannot cover is a host that freezes as a whole (the guard freezes with it): EC2
//! fencing covers that case.

use crate::sys;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the guard checks the deadline: well inside the lease's stop margin (≥ 100 ms).
const POLL: Duration = Duration::from_millis(100);

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn read_deadline(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

pub fn guard_pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("guard.pid")
}

pub fn agent_pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.pid")
}

/// Runs the guard until there is nothing left to guard.
pub fn run(state_dir: &Path, data_dir: &Path) -> Result<()> {
    let me = std::process::id() as i32;
    let pid_file = guard_pid_file(state_dir);
    sys::write_atomic(&pid_file, &format!("{me}\n")).context("write guard.pid")?;
    let deadline_file = state_dir.join("lease.deadline");
    let mut stopped_for = 0u64;
    let mut dropped_for = 0u64;
    eprintln!("guard {me}: watching {}", data_dir.display());
    loop {
        if read_pid(&pid_file) != Some(me) {
            eprintln!("guard {me}: replaced by a newer guard");
            return Ok(());
        }
        let agent_alive = read_pid(&agent_pid_file(state_dir)).is_some_and(sys::pid_alive);
        let postmaster = read_pid(&data_dir.join("postmaster.pid")).filter(|p| sys::pid_alive(*p));
        let deadline = read_deadline(&deadline_file);
        let writable = !data_dir.join("standby.signal").exists();
        if deadline != 0 && deadline != dropped_for && sys::monotonic_ms() >= deadline {
            // The addresses clients use go first, also when PostgreSQL is gone already.
            drop_addresses(state_dir, me);
            dropped_for = deadline;
        }
        if let Some(pm) = postmaster {
            if deadline != 0
                && deadline != stopped_for
                && writable
                && sys::monotonic_ms() >= deadline
            {
                eprintln!(
                    "guard {me}: the lease deadline passed (agent {}); stopping PostgreSQL {pm}",
                    if agent_alive { "running" } else { "dead" }
                );
                let _ = sys::signal(pm, libc::SIGQUIT);
                stopped_for = deadline;
            }
        } else if !agent_alive {
            eprintln!("guard {me}: neither the agent nor PostgreSQL runs; exiting");
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Removes the addresses the agent listed in `<state_dir>/endpoints.json` (VIP, EC2 secondary
/// and overlay IPs) from this host's interfaces.
fn drop_addresses(state_dir: &Path, me: i32) {
    let Ok(text) = std::fs::read_to_string(state_dir.join("endpoints.json")) else {
        return;
    };
    let Ok(addrs) = serde_json::from_str::<Vec<pgwarden_core::endpoints::OsAddress>>(&text) else {
        return;
    };
    if addrs.is_empty() {
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("guard {me}: cannot remove the addresses: {e}");
            return;
        }
    };
    let removed = rt.block_on(async {
        let net = crate::netaddr::Netlink::open()?;
        let removed = tokio::time::timeout(
            Duration::from_millis(200),
            crate::endpoints::remove_addresses(&net, &addrs),
        )
        .await
        .unwrap_or_default();
        anyhow::Ok(removed)
    });
    match removed {
        Ok(r) if !r.is_empty() => {
            eprintln!(
                "guard {me}: the lease deadline passed; removed {}",
                r.join(", ")
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("guard {me}: cannot remove the addresses: {e:#}"),
    }
}

/// Starts a guard unless one runs for this state directory. Records the agent's PID for it.
pub fn ensure(state_dir: &Path, data_dir: &Path) -> Result<()> {
    sys::write_atomic(
        &agent_pid_file(state_dir),
        &format!("{}\n", std::process::id()),
    )?;
    if let Some(pid) = read_pid(&guard_pid_file(state_dir)) {
        if sys::pid_alive(pid) && sys::cmdline(pid).is_some_and(|c| c.contains(" guard ")) {
            return Ok(());
        }
    }
    let exe = std::env::current_exe().context("find the agent binary for the guard")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("guard.log"))
        .context("open guard.log")?;
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new(exe)
        .arg("guard")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("start the guard")?;
    tracing::info!(pid = child.id(), "started the lease guard");
    // Wait until it announced itself, so two agents' checks do not race.
    for _ in 0..40 {
        if read_pid(&guard_pid_file(state_dir)) == Some(child.id() as i32) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}
