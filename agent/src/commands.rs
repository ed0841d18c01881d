//! Commands pushed by the control plane (`POST /v1/commands`): each is carried out once, by an
//! internal call to the agent's own API (`CommandKind::agent_route`), whatever how many times
//! it is delivered. The table of recent commands is kept in `<state_dir>/commands.json` so
//! that a command delivered again after a restart is not run again; a command that was running
//! when the agent stopped is marked failed at the next start. State changes reach the server
//! with the next report (`server_link`).

use crate::agent::Shared;
use crate::http::{problem, ApiJson};
use crate::sys::now_ms;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgwarden_core::api::Problem;
use pgwarden_core::control::{AgentCommand, AgentCommandState, CommandPhase};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tower::ServiceExt;

/// How many commands the table keeps (the newest).
pub const KEEP: usize = 200;

/// The message of a command found running at start.
pub const INTERRUPTED: &str = "the agent restarted while it ran";

/// The recent commands, oldest first, each with the revision of its last change.
#[derive(Clone, Debug, Default)]
pub struct Table {
    entries: Vec<(AgentCommandState, u64)>,
    rev: u64,
}

/// What `Table::receive` made of a delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// Seen before: not run again; `deliveries` counts this one.
    Known(AgentCommandState),
    /// New: recorded as running, to be carried out.
    New(AgentCommandState),
}

impl Table {
    /// The table as saved; commands that were running are marked failed (returned too).
    pub fn from_saved(
        saved: Vec<AgentCommandState>,
        now_ms: u64,
    ) -> (Table, Vec<AgentCommandState>) {
        let mut t = Table::default();
        let mut interrupted = Vec::new();
        for mut s in saved {
            if !s.state.is_final() {
                s.state = CommandPhase::Failed;
                s.message = INTERRUPTED.into();
                s.finished_ms = Some(now_ms);
                interrupted.push(s.clone());
            }
            t.rev += 1;
            t.entries.push((s, t.rev));
        }
        t.trim();
        (t, interrupted)
    }

    fn bump(&mut self) -> u64 {
        self.rev += 1;
        self.rev
    }

    /// Drops the oldest finished commands beyond `KEEP` (the oldest running ones only when
    /// every kept command runs).
    fn trim(&mut self) {
        while self.entries.len() > KEEP {
            let i = self
                .entries
                .iter()
                .position(|(s, _)| s.state.is_final())
                .unwrap_or(0);
            self.entries.remove(i);
        }
    }

    /// A delivery of `cmd`: counted when known, else recorded as running.
    pub fn receive(&mut self, cmd: &AgentCommand, now_ms: u64) -> Received {
        let rev = self.bump();
        if let Some((s, r)) = self.entries.iter_mut().find(|(s, _)| s.id == cmd.id) {
            s.deliveries = s.deliveries.saturating_add(1);
            *r = rev;
            return Received::Known(s.clone());
        }
        let s = AgentCommandState {
            id: cmd.id.clone(),
            kind: cmd.kind,
            state: CommandPhase::Running,
            message: "running".into(),
            result: None,
            started_ms: now_ms,
            finished_ms: None,
            deliveries: 1,
        };
        self.entries.push((s.clone(), rev));
        self.trim();
        Received::New(s)
    }

    /// Forgets a command (one that could not be recorded durably).
    pub fn remove(&mut self, id: &str) {
        self.entries.retain(|(s, _)| s.id != id);
    }

    /// Records the end of a command.
    pub fn finish(
        &mut self,
        id: &str,
        ok: bool,
        message: String,
        result: serde_json::Value,
        now_ms: u64,
    ) -> Option<AgentCommandState> {
        let rev = self.bump();
        let (s, r) = self.entries.iter_mut().find(|(s, _)| s.id == id)?;
        s.state = if ok {
            CommandPhase::Succeeded
        } else {
            CommandPhase::Failed
        };
        s.message = message;
        s.result = Some(result);
        s.finished_ms = Some(now_ms);
        *r = rev;
        Some(s.clone())
    }

    pub fn get(&self, id: &str) -> Option<AgentCommandState> {
        self.entries
            .iter()
            .find(|(s, _)| s.id == id)
            .map(|(s, _)| s.clone())
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<AgentCommandState> {
        self.entries.iter().rev().map(|(s, _)| s.clone()).collect()
    }

    /// Oldest first, as saved.
    pub fn saved(&self) -> Vec<AgentCommandState> {
        self.entries.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The commands changed after revision `since` (oldest change first) and the current
    /// revision, to pass as `since` once they were acknowledged.
    pub fn changed_since(&self, since: u64) -> (Vec<AgentCommandState>, u64) {
        let mut v: Vec<&(AgentCommandState, u64)> =
            self.entries.iter().filter(|(_, r)| *r > since).collect();
        v.sort_by_key(|(_, r)| *r);
        (v.into_iter().map(|(s, _)| s.clone()).collect(), self.rev)
    }
}

/// The table, shared by the API handlers and the reports, saved at every change.
pub struct Commands {
    path: PathBuf,
    table: Mutex<Table>,
}

impl Commands {
    /// Loads `<state_dir>/commands.json`; returns the commands that were running when the agent
    /// stopped (now failed, and saved so). A file that cannot be read is moved aside.
    pub fn load(state_dir: &Path) -> (Commands, Vec<AgentCommandState>) {
        let path = state_dir.join("commands.json");
        let saved: Vec<AgentCommandState> = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(e) => {
                    let aside = path.with_file_name(format!("commands.json.bad-{}", now_ms()));
                    tracing::warn!(
                        error = %e,
                        path = %path.display(),
                        moved_to = %aside.display(),
                        "cannot parse the command table; starting with an empty one"
                    );
                    let _ = std::fs::rename(&path, &aside);
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read the command table");
                Vec::new()
            }
        };
        let (table, interrupted) = Table::from_saved(saved, now_ms());
        let c = Commands {
            path,
            table: Mutex::new(table),
        };
        if !interrupted.is_empty() {
            let t = c.lock();
            if let Err(e) = c.save(&t) {
                tracing::warn!(error = %format!("{e:#}"), "cannot save the command table");
            }
        }
        (c, interrupted)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, t: &Table) -> Result<()> {
        let text = serde_json::to_vec_pretty(&t.saved()).context("encode the command table")?;
        crate::sys::write_durable(&self.path, &text, 0o600)
    }

    /// A delivery; a new command is saved before it may run (an error: it must not run).
    pub fn receive(&self, cmd: &AgentCommand) -> Result<Received> {
        let mut t = self.lock();
        let r = t.receive(cmd, now_ms());
        if let Err(e) = self.save(&t) {
            if matches!(r, Received::New(_)) {
                t.remove(&cmd.id);
                return Err(e);
            }
            tracing::warn!(error = %format!("{e:#}"), "cannot save the command table");
        }
        Ok(r)
    }

    /// Records the end of a command and saves the table.
    pub fn finish(
        &self,
        id: &str,
        ok: bool,
        message: String,
        result: serde_json::Value,
    ) -> Option<AgentCommandState> {
        let mut t = self.lock();
        let s = t.finish(id, ok, message, result, now_ms());
        if let Err(e) = self.save(&t) {
            tracing::warn!(error = %format!("{e:#}"), "cannot save the command table");
        }
        s
    }

    pub fn get(&self, id: &str) -> Option<AgentCommandState> {
        self.lock().get(id)
    }

    pub fn recent(&self) -> Vec<AgentCommandState> {
        self.lock().recent()
    }

    pub fn changed_since(&self, since: u64) -> (Vec<AgentCommandState>, u64) {
        self.lock().changed_since(since)
    }
}

/// Whether an agent API answer means success, and the command's message: the operation's
/// `message`, or the problem's `detail`, or the body's text.
pub fn outcome(status: u16, body: &serde_json::Value) -> (bool, String) {
    let ok = (200..300).contains(&status);
    let field = |k: &str| {
        body.get(k)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let message = if ok {
        field("message").unwrap_or_else(|| format!("done ({status})"))
    } else {
        field("detail")
            .or_else(|| field("title"))
            .or_else(|| body.as_str().map(String::from))
            .unwrap_or_else(|| format!("the agent API answered {status}"))
    };
    (ok, message)
}

/// Carries out a command through the agent's own API and records how it ended.
pub async fn execute(shared: Arc<Shared>, cmd: AgentCommand) {
    let (status, body) = match call_api(&shared, &cmd).await {
        Ok(v) => v,
        Err(e) => (500, serde_json::Value::String(format!("{e:#}"))),
    };
    let (ok, message) = outcome(status, &body);
    let result = serde_json::json!({"status": status, "body": body});
    if shared
        .commands
        .finish(&cmd.id, ok, message.clone(), result)
        .is_none()
    {
        tracing::warn!(id = %cmd.id, "a finished command was no longer in the table");
    }
    shared.events.record(
        "command_finished",
        format!(
            "command {} ({}) {}: {message}",
            cmd.id,
            cmd.kind.as_str(),
            if ok { "succeeded" } else { "failed" }
        ),
    );
}

/// One request through the API router, authenticated with the agent's token: the status and
/// the body (JSON, else text).
async fn call_api(shared: &Arc<Shared>, cmd: &AgentCommand) -> Result<(u16, serde_json::Value)> {
    let (method, path) = cmd.kind.agent_route();
    let args = if cmd.args.is_null() {
        serde_json::json!({})
    } else {
        cmd.args.clone()
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", shared.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(&args).context("encode the arguments")?,
        ))
        .context("build the request")?;
    let resp = crate::http::api_router(shared.clone())
        .oneshot(req)
        .await
        .context("call the agent API")?;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .context("read the agent API's answer")?;
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    Ok((status, body))
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{id:?} is not a command id (1-128 characters, no control characters)"
        ));
    }
    Ok(())
}

/// `POST /v1/commands`: 202 and the state for a new command (it runs in the background), 200
/// and the current state for one already received.
pub async fn post_command(
    State(shared): State<Arc<Shared>>,
    ApiJson(cmd): ApiJson<AgentCommand>,
) -> Response {
    if let Err(m) = check_id(&cmd.id) {
        return problem(Problem::new(422, "Invalid request body", m).field("id"));
    }
    match shared.commands.receive(&cmd) {
        Ok(Received::Known(s)) => (StatusCode::OK, Json(s)).into_response(),
        Ok(Received::New(s)) => {
            shared.events.record(
                "command_started",
                format!("command {} ({}) started", cmd.id, cmd.kind.as_str()),
            );
            tokio::spawn(execute(shared.clone(), cmd));
            (StatusCode::ACCEPTED, Json(s)).into_response()
        }
        Err(e) => problem(Problem::new(
            503,
            "Unavailable",
            format!("cannot record the command durably, so it was not run: {e:#}"),
        )),
    }
}

/// `GET /v1/commands/{id}`.
pub async fn get_command(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match shared.commands.get(&id) {
        Some(s) => Json(s).into_response(),
        None => problem(Problem::new(
            404,
            "Not Found",
            format!("no command {id:?} (the agent keeps the newest {KEEP})"),
        )),
    }
}

/// `GET /v1/commands`: the recent commands, newest first.
pub async fn list_commands(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.commands.recent()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_core::control::CommandKind;

    fn cmd(id: &str) -> AgentCommand {
        AgentCommand {
            id: id.into(),
            kind: CommandKind::Restart,
            args: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_command_runs_once_however_often_it_is_delivered() {
        let mut t = Table::default();
        let Received::New(s) = t.receive(&cmd("c1"), 10) else {
            panic!("new")
        };
        assert_eq!(s.state, CommandPhase::Running);
        assert_eq!((s.deliveries, s.started_ms), (1, 10));
        let Received::Known(s) = t.receive(&cmd("c1"), 20) else {
            panic!("known")
        };
        assert_eq!((s.deliveries, s.started_ms), (2, 10));
        let done = t
            .finish("c1", true, "restarted".into(), serde_json::json!({}), 30)
            .unwrap();
        assert_eq!(done.state, CommandPhase::Succeeded);
        assert_eq!(done.finished_ms, Some(30));
        let Received::Known(s) = t.receive(&cmd("c1"), 40) else {
            panic!("known")
        };
        assert_eq!((s.state, s.deliveries), (CommandPhase::Succeeded, 3));
        assert!(t
            .finish("nope", false, "x".into(), serde_json::json!(null), 1)
            .is_none());
        assert!(matches!(t.receive(&cmd("c2"), 50), Received::New(_)));
        let ids: Vec<String> = t.recent().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["c2", "c1"]);
        assert_eq!(t.get("c2").unwrap().state, CommandPhase::Running);
        t.remove("c2");
        assert_eq!(t.get("c2"), None);
    }

    #[test]
    fn the_table_keeps_the_newest_and_drops_finished_ones_first() {
        let mut t = Table::default();
        assert!(matches!(
            t.receive(&cmd("old-running"), 0),
            Received::New(_)
        ));
        for i in 0..KEEP + 10 {
            let id = format!("c{i}");
            t.receive(&cmd(&id), i as u64);
            t.finish(&id, true, "ok".into(), serde_json::json!({}), i as u64);
        }
        assert_eq!(t.saved().len(), KEEP);
        assert!(t.get("old-running").is_some(), "running commands are kept");
        assert_eq!(t.get("c0"), None);
        assert!(t.get(&format!("c{}", KEEP + 9)).is_some());
        assert_eq!(t.recent()[0].id, format!("c{}", KEEP + 9));
    }

    #[test]
    fn changes_are_reported_until_acknowledged() {
        let mut t = Table::default();
        t.receive(&cmd("a"), 1);
        t.receive(&cmd("b"), 2);
        let (v, rev) = t.changed_since(0);
        assert_eq!(
            v.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(t.changed_since(rev).0, vec![]);
        t.finish("a", false, "no".into(), serde_json::json!({}), 3);
        let (v, rev2) = t.changed_since(rev);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].id.as_str(), v[0].state), ("a", CommandPhase::Failed));
        t.receive(&cmd("b"), 4);
        let (v, _) = t.changed_since(rev2);
        assert_eq!((v[0].id.as_str(), v[0].deliveries), ("b", 2));
    }

    #[test]
    fn commands_running_at_a_restart_are_marked_failed() {
        let mut t = Table::default();
        t.receive(&cmd("done"), 1);
        t.finish("done", true, "ok".into(), serde_json::json!({}), 2);
        t.receive(&cmd("cut"), 3);
        let (t2, interrupted) = Table::from_saved(t.saved(), 99);
        assert_eq!(interrupted.len(), 1);
        let cut = t2.get("cut").unwrap();
        assert_eq!(cut.state, CommandPhase::Failed);
        assert_eq!(cut.message, INTERRUPTED);
        assert_eq!(cut.finished_ms, Some(99));
        assert_eq!(t2.get("done").unwrap().state, CommandPhase::Succeeded);
        // Everything is reported once after a restart; a delivery again does not run it.
        assert_eq!(t2.changed_since(0).0.len(), 2);
        let mut t2 = t2;
        assert!(matches!(t2.receive(&cmd("cut"), 100), Received::Known(_)));
    }

    #[test]
    fn the_table_survives_a_restart_on_disk() {
        let dir = std::env::temp_dir().join(format!("pgwarden-commands-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (c, interrupted) = Commands::load(&dir);
        assert!(interrupted.is_empty());
        assert!(matches!(c.receive(&cmd("x")), Ok(Received::New(_))));
        assert!(matches!(c.receive(&cmd("y")), Ok(Received::New(_))));
        c.finish("y", true, "ok".into(), serde_json::json!({"status": 200}));
        let (c, interrupted) = Commands::load(&dir);
        assert_eq!(interrupted.len(), 1);
        assert_eq!(interrupted[0].id, "x");
        assert_eq!(c.get("x").unwrap().message, INTERRUPTED);
        assert!(matches!(c.receive(&cmd("x")), Ok(Received::Known(_))));
        // The marking was saved: a third start finds nothing running.
        let (_, interrupted) = Commands::load(&dir);
        assert!(interrupted.is_empty());
        std::fs::write(dir.join("commands.json"), "{not json").unwrap();
        let (c, _) = Commands::load(&dir);
        assert!(c.recent().is_empty());
        assert!(!dir.join("commands.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn outcomes_take_the_operation_or_problem_text() {
        let ok = serde_json::json!({"operation": "restart", "ok": true, "message": "restarted"});
        assert_eq!(outcome(200, &ok), (true, "restarted".into()));
        assert_eq!(
            outcome(202, &serde_json::json!({})),
            (true, "done (202)".into())
        );
        let p =
            serde_json::json!({"title": "No quorum", "status": 503, "detail": "pause: no leader"});
        assert_eq!(outcome(503, &p), (false, "pause: no leader".into()));
        assert_eq!(
            outcome(502, &serde_json::json!("bad gateway")),
            (false, "bad gateway".into())
        );
        assert_eq!(
            outcome(500, &serde_json::json!(null)),
            (false, "the agent API answered 500".into())
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("3f2a-1").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("a\nb").is_err());
        assert!(check_id(&"x".repeat(129)).is_err());
    }
}
