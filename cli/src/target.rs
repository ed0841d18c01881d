//! Where `pgwardenctl` sends its requests: the control plane (`--server`, the default) or one
//! agent (`--agent`, the direct mode), and the CLI configuration file that remembers the
//! server, its API token and its CA (`~/.config/pgwarden/pgwardenctl.toml`, written by
//! `pgwardenctl login`).
//!
//! Precedence: command-line flags, then environment variables, then the file. The file is
//! read only in server mode.

use anyhow::{bail, Context, Result};
use pgwarden_core::config::ConfigError;
use std::path::{Path, PathBuf};

/// The keys the CLI configuration file may hold.
pub const KEYS: [&str; 3] = ["server", "token", "ca_file"];

/// The contents of the CLI configuration file. `ca_file` is resolved against the file's
/// directory when relative.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/pgwarden/pgwardenctl.toml`, else `~/.config/pgwarden/pgwardenctl.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("pgwarden").join("pgwardenctl.toml"))
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line (1-based) that defines top-level `key`: `key = …`, `key.sub = …`,
/// `"key" = …`, or a table header `[key]` / `[key.sub]` / `[[key]]`.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|raw| {
            let l = raw.trim();
            let name = if l.starts_with('[') {
                l.trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or("")
                    .to_string()
            } else {
                match l.split_once('=') {
                    Some((k, _)) => k.to_string(),
                    None => return false,
                }
            };
            name.split('.')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                == key
        })
        .map(|i| i + 1)
}

/// Parses the text of the CLI configuration file `file`.
pub fn parse(text: &str, file: &Path) -> Result<FileConfig, ConfigError> {
    let err = |line: Option<usize>, key: Option<&str>, message: String| ConfigError {
        file: file.display().to_string(),
        line,
        key: key.map(str::to_string),
        message,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        err(
            e.span().map(|s| line_of(text, s.start)),
            None,
            e.message().trim().to_string(),
        )
    })?;
    let mut unknown: Vec<(Option<usize>, &String)> = table
        .keys()
        .filter(|k| !KEYS.contains(&k.as_str()))
        .map(|k| (key_line(text, k), k))
        .collect();
    unknown.sort();
    if let Some((line, key)) = unknown.first() {
        return Err(err(
            *line,
            Some(key),
            format!("unknown key; the keys are {}", KEYS.join(", ")),
        ));
    }
    let string = |k: &str| -> Result<Option<String>, ConfigError> {
        match table.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Some(toml::Value::String(_)) => {
                Err(err(key_line(text, k), Some(k), "must not be empty".into()))
            }
            Some(_) => Err(err(key_line(text, k), Some(k), "must be a string".into())),
        }
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    Ok(FileConfig {
        server: string("server")?,
        token: string("token")?,
        ca_file: string("ca_file")?.map(|p| dir.join(p)),
    })
}

/// Reads the CLI configuration file; a file that does not exist is an empty configuration.
pub fn load(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse(&text, path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// The file's text for `cfg`.
pub fn render(cfg: &FileConfig) -> String {
    let mut out = String::from("# pgwardenctl's configuration (written by `pgwardenctl login`).\n");
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("{k} = {}\n", toml::Value::String(v)));
        }
    };
    put("server", cfg.server.clone());
    put("token", cfg.token.clone());
    put(
        "ca_file",
        cfg.ca_file.as_ref().map(|p| p.display().to_string()),
    );
    out
}

/// Writes `cfg` to `path`, readable by its owner only (it holds a token): a new file in the
/// same directory, then renamed over the old one.
pub fn write(path: &Path, cfg: &FileConfig) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", tmp.display()))?;
    f.write_all(render(cfg).as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Where a flag's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
}

/// The mode the flags and environment select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Direct-agent mode, with the agent's URL.
    Agent(String),
    /// Server mode; `None`: the URL comes from the CLI configuration file.
    Server(Option<String>),
}

/// Chooses between `--server` and `--agent`: a flag wins over an environment variable; two
/// flags, or two environment variables and no flag, are an error.
pub fn choose(server: Option<(&str, Source)>, agent: Option<(&str, Source)>) -> Result<Choice> {
    match (server, agent) {
        (Some((_, Source::Flag)), Some((_, Source::Flag))) => {
            bail!("--server and --agent: give one (the server, or one agent directly)")
        }
        (_, Some((a, Source::Flag))) => Ok(Choice::Agent(a.to_string())),
        (Some((s, Source::Flag)), _) => Ok(Choice::Server(Some(s.to_string()))),
        (Some(_), Some(_)) => bail!(
            "PGWARDEN_SERVER and PGWARDEN_AGENT are both set: unset one, or choose with \
             --server URL or --agent URL"
        ),
        (_, Some((a, Source::Env))) => Ok(Choice::Agent(a.to_string())),
        (Some((s, Source::Env)), None) => Ok(Choice::Server(Some(s.to_string()))),
        (None, None) => Ok(Choice::Server(None)),
    }
}

/// The error when nothing names a target.
pub fn no_target(file: Option<&Path>) -> anyhow::Error {
    let file = file.map_or("the CLI configuration file".to_string(), |f| {
        f.display().to_string()
    });
    anyhow::anyhow!(
        "no server to talk to: give the control plane with --server https://HOST:PORT (or \
         PGWARDEN_SERVER, or `server = \"https://…\"` in {file}, which `pgwardenctl login` \
         writes), or talk to one agent directly with --agent URL (or PGWARDEN_AGENT)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_environment_and_two_of_a_kind_are_refused() {
        use Source::*;
        let s = Some(("https://cp:9443", Flag));
        let a = Some(("https://n1:8443", Flag));
        assert!(choose(s, a).is_err());
        assert_eq!(
            choose(Some(("https://cp:9443", Env)), a).unwrap(),
            Choice::Agent("https://n1:8443".into())
        );
        assert_eq!(
            choose(s, Some(("https://n1:8443", Env))).unwrap(),
            Choice::Server(Some("https://cp:9443".into()))
        );
        let e = choose(Some(("x", Env)), Some(("y", Env))).unwrap_err();
        assert!(e.to_string().contains("both set"), "{e}");
        assert_eq!(
            choose(None, Some(("y", Env))).unwrap(),
            Choice::Agent("y".into())
        );
        assert_eq!(
            choose(Some(("x", Env)), None).unwrap(),
            Choice::Server(Some("x".into()))
        );
        assert_eq!(choose(None, None).unwrap(), Choice::Server(None));
    }

    #[test]
    fn the_file_has_three_keys_and_names_an_unknown_one_with_its_line() {
        let f = Path::new("/home/ann/.config/pgwarden/pgwardenctl.toml");
        let c = parse(
            "# a comment\nserver = \"https://cp:9443\"\ntoken = \"pgw_x\"\nca_file = \"ca.pem\"\n",
            f,
        )
        .unwrap();
        assert_eq!(c.server.as_deref(), Some("https://cp:9443"));
        assert_eq!(c.token.as_deref(), Some("pgw_x"));
        assert_eq!(
            c.ca_file,
            Some(PathBuf::from("/home/ann/.config/pgwarden/ca.pem"))
        );
        let abs = parse("ca_file = \"/etc/pgwarden/ca.pem\"\n", f).unwrap();
        assert_eq!(abs.ca_file, Some(PathBuf::from("/etc/pgwarden/ca.pem")));

        let e = parse("server = \"https://cp\"\n\ntokn = \"x\"\n", f).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/home/ann/.config/pgwarden/pgwardenctl.toml:3: key `tokn`: unknown key; the keys \
             are server, token, ca_file"
        );
        let e = parse("server = \"a\"\n[extra]\nx = 1\n", f).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("extra")));
        let e = parse("server = 8443\n", f).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("server")));
        let e = parse("server = \n", f).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn written_files_read_back_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgwardenctl-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("pgwardenctl.toml");
        let cfg = FileConfig {
            server: Some("https://cp:9443".into()),
            token: Some("pgw_\"quoted\"".into()),
            ca_file: Some(PathBuf::from("/etc/pgwarden/ca.pem")),
        };
        write(&path, &cfg).unwrap();
        assert_eq!(load(&path).unwrap(), cfg);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load(&dir.join("missing.toml")).unwrap(),
            FileConfig::default()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
