//! A throwaway PostgreSQL server for the control plane's store tests (the server crate's own
//! and the end-to-end ones): initdb in a temporary directory, listening on a loopback port,
//! trust authentication, stopped and removed on drop. As root it runs as the `postgres` user
//! (PostgreSQL refuses to run as root).

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

pub struct TempPostgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
}

fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres"))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TempPostgres {
    /// Starts one, or — outside CI only — says SKIPPED and returns `None` when this machine
    /// has no PostgreSQL. In CI (`CI=true`) a missing PostgreSQL fails the test.
    pub fn start_or_skip(test: &str) -> Option<TempPostgres> {
        match TempPostgres::start(test) {
            Ok(pg) => Some(pg),
            Err(e) if !crate::in_ci() => {
                eprintln!("SKIPPED {test}: no PostgreSQL here ({e:#}); CI runs it");
                None
            }
            Err(e) => panic!("{test} needs PostgreSQL: {e:#}"),
        }
    }

    pub fn start(name: &str) -> Result<TempPostgres> {
        TempPostgres::start_on(name, false)
    }

    /// Also reachable from the lab hosts (10.77.0.0/16, through a lab bridge's address).
    pub fn start_for_labs(name: &str) -> Result<TempPostgres> {
        TempPostgres::start_on(name, true)
    }

    fn start_on(name: &str, labs: bool) -> Result<TempPostgres> {
        let bin = crate::LabSpec::new("store").pg_bin;
        if !bin.join("initdb").is_file() {
            bail!(
                "no PostgreSQL binaries at {} (scripts/install-deps.sh installs them)",
                bin.display()
            );
        }
        let owner = if crate::is_root() {
            Some(postgres_user().context("no postgres user in /etc/passwd")?)
        } else {
            None
        };
        let dir =
            std::env::temp_dir().join(format!("pgwarden-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(&dir, Some(u), Some(g))?;
        }
        let port = free_port()?;
        let pg = TempPostgres {
            dir,
            port,
            bin,
            owner,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )?;
        let listen = if labs {
            std::fs::OpenOptions::new()
                .append(true)
                .open(format!("{}/pg_hba.conf", pg.data()))
                .and_then(|mut f| {
                    use std::io::Write;
                    writeln!(f, "host all all 10.77.0.0/16 trust")
                })
                .context("pg_hba.conf")?;
            "*"
        } else {
            "127.0.0.1"
        };
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &pg.data(),
                "-l",
                &format!("{}/log", pg.dir.display()),
                "-w",
                "-o",
                &format!(
                    "-p {} -c listen_addresses={listen} -k {} -c fsync=off",
                    pg.port,
                    pg.dir.display()
                ),
                "start",
            ],
        )?;
        Ok(pg)
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.display())
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<()> {
        let mut c = Command::new(self.bin.join(prog));
        c.args(args).current_dir(&self.dir);
        if let Some((u, g)) = self.owner {
            c.uid(u).gid(g);
        }
        let out = c.output().with_context(|| format!("run {prog}"))?;
        if !out.status.success() {
            bail!(
                "{prog} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A URL for a new, empty database.
    pub fn create_db(&self, db: &str) -> Result<String> {
        self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                db,
            ],
        )?;
        Ok(format!("postgres://postgres@127.0.0.1:{}/{db}", self.port))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
