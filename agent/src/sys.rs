//! Small operating-system helpers: users, process liveness, clocks, signals.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in milliseconds: the same clock in every process of the host, never set
/// back, so the agent and its guard compare lease deadlines with it.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// The uid and gid of a local user, from /etc/passwd.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            let uid = f[2].parse().context("parse uid")?;
            let gid = f[3].parse().context("parse gid")?;
            return Ok((uid, gid));
        }
    }
    bail!("operating-system user {name:?} does not exist (postgresql.os_user)")
}

/// True while `pid` is a live process (a zombie counts as dead).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name in parentheses, which may contain spaces.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The command line of `pid`, arguments joined with spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

pub fn signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) with a positive pid only sends a signal; errors are reported via errno.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        bail!(
            "signal {sig} to pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Makes `path` owned by `owner` (when the agent runs as root) with `mode`.
pub fn set_owner_mode(path: &Path, owner: Option<(u32, u32)>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}

/// Writes a file atomically (write to a temporary name, then rename).
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("pgwarden-tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// Writes a file so that a crash leaves either the old or the new contents: a temporary
/// `<name>.tmp` beside it, fsynced, renamed over it, and the directory fsynced. `mode` sets the
/// permissions of a new file.
pub fn write_durable(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", dir.display()))?;
    }
    Ok(())
}

/// Failpoints force rare paths in tests: `PGWARDEN_FAILPOINTS=pg_rewind` makes that step fail.
/// Unset in production, where this always returns false.
///
/// With `PGWARDEN_FAILPOINT_FILE` set (to a path), the names listed in that file count too,
/// read at each check, so a test can turn a failpoint on and off on one node while it runs.
pub fn failpoint(name: &str) -> bool {
    let listed = |v: &str| v.split([',', '\n']).any(|f| f.trim() == name);
    std::env::var("PGWARDEN_FAILPOINTS").is_ok_and(|v| listed(&v))
        || std::env::var("PGWARDEN_FAILPOINT_FILE")
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|v| listed(&v))
}
