//! Background work: delivering commands to agents and following them to their outcome,
//! watching for agents that stopped reporting, pruning old lag samples, fetching failover
//! records, and the live event stream; it also starts the webhook delivery loop
//! (`delivery`). With several servers on one store, a command (and a webhook delivery) is
//! handled by the server that claimed it, and the watch by the holder of the `monitor` lease.

use crate::app::{Counters, Shared};
use crate::store::{now_ms, CommandRow, EventFilter, EventRow, NodeRow};
use anyhow::Result;
use futures_util::Stream;
use pgwarden_core::control::{AgentCommand, AgentCommandState, CommandPhase};
use sqlx::Row;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a server's claim on a command lasts; renewed at every look.
const CLAIM_MS: i64 = 15_000;

pub fn spawn(app: Shared) {
    let a = app.clone();
    tokio::spawn(async move { command_loop(a).await });
    let a = app.clone();
    tokio::spawn(async move { crate::delivery::run(a).await });
    tokio::spawn(async move { monitor_loop(app).await });
}

// ---- commands ----

async fn command_loop(app: Shared) {
    loop {
        if let Err(e) = command_pass(&app).await {
            tracing::warn!(error = %format!("{e:#}"), "command delivery pass failed");
        }
        let _ =
            tokio::time::timeout(Duration::from_millis(500), app.commands_changed.notified()).await;
    }
}

/// One look at every command that needs attention and that no other server holds.
pub async fn command_pass(app: &Shared) -> Result<()> {
    let now = now_ms();
    for c in app.store.claimable_commands(now, 50).await? {
        if !app
            .store
            .claim_command(&c.id, &app.server_id, now + CLAIM_MS, now)
            .await?
        {
            continue; // another server has it
        }
        // The list was read before the claim: another server may have handled the command
        // in between (delivered it, say). Act on what the store says now.
        let Some(c) = app.store.command(&c.id).await? else {
            continue;
        };
        if c.state.is_final() {
            app.store.release_command(&c.id, &app.server_id).await?;
            continue;
        }
        let app2 = app.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(&app2, &c).await {
                tracing::warn!(command = %c.id, error = %format!("{e:#}"), "command handling failed");
            }
            // Let the next look come soon, but not from another server in the same instant.
            let _ = app2.store.release_command(&c.id, &app2.server_id).await;
        });
    }
    Ok(())
}

async fn handle(app: &Shared, c: &CommandRow) -> Result<()> {
    if now_ms() > c.deadline_ms {
        app.store
            .advance_command(
                &c.id,
                CommandPhase::TimedOut,
                &format!("no outcome before the deadline ({})", describe(c)),
                None,
                None,
            )
            .await?;
        app.events_changed.notify_waiters();
        return Ok(());
    }
    match c.state {
        CommandPhase::Queued => deliver(app, c).await,
        _ => follow(app, c).await,
    }
}

fn describe(c: &CommandRow) -> String {
    match (&c.delivered_to, c.state) {
        (Some(n), s) => format!("{} on {n}", s.as_str()),
        (None, _) => "never delivered: no agent of the cluster accepted it".into(),
    }
}

/// The agents to try: the named node for node-level commands; otherwise every node whose
/// agent is up, the primary first (it acts on a switchover without forwarding).
fn targets(c: &CommandRow, nodes: &[NodeRow]) -> Vec<NodeRow> {
    let mut t: Vec<NodeRow> = nodes
        .iter()
        .filter(|n| !n.api_url.is_empty())
        .filter(|n| match &c.node {
            Some(want) => &n.name == want,
            None => true,
        })
        .cloned()
        .collect();
    t.sort_by_key(|n| (!n.agent_up, n.role != "primary", n.name.clone()));
    t
}

async fn deliver(app: &Shared, c: &CommandRow) -> Result<()> {
    let nodes = app.store.nodes(Some(&c.cluster)).await?;
    let body = AgentCommand {
        id: c.id.clone(),
        kind: c.kind,
        args: c.args.clone(),
    };
    let mut errors = Vec::new();
    for n in targets(c, &nodes) {
        // Renew the claim before each try: a try may take the client's whole timeout.
        let now = now_ms();
        if !app
            .store
            .claim_command(&c.id, &app.server_id, now + CLAIM_MS, now)
            .await?
        {
            return Ok(());
        }
        app.store.count_attempt(&c.id).await?;
        let url = format!("{}/v1/commands", n.api_url.trim_end_matches('/'));
        match app.agents.post(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                let st: Option<AgentCommandState> = r.json().await.ok();
                Counters::inc(&app.counters.commands_delivered);
                app.store
                    .advance_command(
                        &c.id,
                        CommandPhase::Delivered,
                        &format!("accepted by {}", n.name),
                        None,
                        Some(&n.name),
                    )
                    .await?;
                if let Some(st) = st {
                    apply_agent_state(app, &st, &n.name).await?;
                }
                app.events_changed.notify_waiters();
                return Ok(());
            }
            Ok(r) => {
                Counters::inc(&app.counters.delivery_failures);
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                errors.push(format!(
                    "{}: {status} {}",
                    n.name,
                    text.chars().take(200).collect::<String>()
                ));
            }
            Err(e) => {
                Counters::inc(&app.counters.delivery_failures);
                errors.push(format!("{}: {e}", n.name));
            }
        }
    }
    let msg = if errors.is_empty() {
        "no agent of the cluster is known yet".to_string()
    } else {
        format!("not delivered yet: {}", errors.join("; "))
    };
    sqlx::query("UPDATE commands SET message = $1 WHERE id = $2 AND state = 'queued'")
        .bind(&msg)
        .bind(&c.id)
        .execute(app.store.pool())
        .await?;
    Ok(())
}

/// Asks the agent that has the command where it is (its reports also tell).
async fn follow(app: &Shared, c: &CommandRow) -> Result<()> {
    let Some(node) = &c.delivered_to else {
        return Ok(());
    };
    let Some(n) = app.store.node(&c.cluster, node).await? else {
        return Ok(());
    };
    let url = format!("{}/v1/commands/{}", n.api_url.trim_end_matches('/'), c.id);
    if let Ok(r) = app.agents.get(&url).send().await {
        if r.status().is_success() {
            if let Ok(st) = r.json::<AgentCommandState>().await {
                apply_agent_state(app, &st, node).await?;
            }
        } else if r.status().as_u16() == 404 {
            // The agent lost it (its state directory was replaced): hand it out again.
            tracing::warn!(command = %c.id, node = %node, "the agent does not know the command");
        }
    }
    Ok(())
}

async fn apply_agent_state(app: &Shared, st: &AgentCommandState, node: &str) -> Result<()> {
    let moved = app
        .store
        .advance_command(
            &st.id,
            st.state,
            &st.message,
            st.result.as_ref(),
            Some(node),
        )
        .await?;
    if moved && st.state.is_final() {
        app.events_changed.notify_waiters();
    }
    Ok(())
}

// ---- watching agents ----

async fn monitor_loop(app: Shared) {
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now_ms();
        match app
            .store
            .worker_lease("monitor", &app.server_id, now + 5_000, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot take the monitor lease");
                continue;
            }
        }
        if let Err(e) = watch_agents(&app).await {
            tracing::warn!(error = %format!("{e:#}"), "watching agents failed");
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = Instant::now();
            let keep = app.cfg.retention.lag_samples.0.as_millis() as i64;
            match app.store.prune_lag(now_ms() - keep).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned old lag samples"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "pruning lag samples failed"),
            }
        }
    }
}

/// Agents silent for `down_after` are polled; one that does not answer is marked down.
async fn watch_agents(app: &Shared) -> Result<()> {
    let down_after = app.cfg.agents.down_after.0.as_millis() as i64;
    for n in app.store.silent_nodes(now_ms() - down_after).await? {
        let url = format!("{}/v1/status", n.api_url.trim_end_matches('/'));
        let pulled = match app.agents.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        match pulled {
            Some(status) => {
                // It answers but does not report (e.g. it cannot reach this server).
                app.store.touch_node(&n.cluster, &n.name, &status).await?;
            }
            None => {
                if app
                    .store
                    .mark_down(
                        &n.cluster,
                        &n.name,
                        &format!(
                            "no report for {} s and no answer at {}",
                            (now_ms() - n.last_report_ms) / 1000,
                            n.api_url
                        ),
                    )
                    .await?
                {
                    app.events_changed.notify_waiters();
                }
            }
        }
    }
    Ok(())
}

/// Fetches an agent's failover records and stores them.
pub async fn fetch_history(app: &Shared, cluster: &str, api_url: &str) {
    let url = format!("{}/v1/history", api_url.trim_end_matches('/'));
    let v = match app.agents.get(&url).send().await {
        Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
        _ => None,
    };
    let Some(records) = v
        .as_ref()
        .and_then(|v| v.get("failovers"))
        .and_then(|f| f.as_array())
    else {
        return;
    };
    for r in records {
        if let Some(epoch) = r.get("epoch").and_then(|e| e.as_i64()) {
            if let Err(e) = app.store.put_failover_record(cluster, epoch, r).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot store a failover record");
            }
        }
    }
}

// ---- the live event stream ----

pub async fn max_event_seq(app: &Shared) -> Result<i64> {
    let r = sqlx::query("SELECT MAX(seq) AS m FROM events")
        .fetch_one(app.store.pool())
        .await?;
    Ok(r.try_get::<Option<i64>, _>("m")?.unwrap_or(0))
}

/// How long an event's sequence number may take to become visible: a transaction that took a
/// lower number may commit after one that took a higher number.
const SETTLE: Duration = Duration::from_secs(5);

struct StreamState {
    app: Shared,
    filter: EventFilter,
    /// Every event at or below this seq was sent (or settled before the stream began).
    floor: i64,
    /// Sent events above `floor`, with when they were first seen.
    sent: BTreeMap<i64, Instant>,
    ready: VecDeque<EventRow>,
}

/// Events stored after `start`, in the order they become visible, each once.
pub fn event_stream(app: Shared, filter: EventFilter, start: i64) -> impl Stream<Item = EventRow> {
    let st = StreamState {
        app,
        filter,
        floor: start,
        sent: BTreeMap::new(),
        ready: VecDeque::new(),
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.ready.pop_front() {
                return Some((e, st));
            }
            let notified = st.app.events_changed.notified();
            let mut f = st.filter.clone();
            f.after_seq = Some(st.floor);
            match st.app.store.events(&f).await {
                Ok(rows) => {
                    let now = Instant::now();
                    for r in rows {
                        if let std::collections::btree_map::Entry::Vacant(v) = st.sent.entry(r.seq)
                        {
                            v.insert(now);
                            st.ready.push_back(r);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "event stream query failed"),
            }
            // Raise the floor past events that settled.
            let settled: Vec<i64> = st
                .sent
                .iter()
                .take_while(|(_, t)| t.elapsed() > SETTLE)
                .map(|(s, _)| *s)
                .collect();
            if let Some(&top) = settled.last() {
                st.floor = st.floor.max(top);
                st.sent.retain(|s, _| *s > top);
            }
            if st.ready.is_empty() {
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, role: &str, up: bool) -> NodeRow {
        NodeRow {
            cluster: "main".into(),
            name: name.into(),
            api_url: format!("https://{name}:8443"),
            agent_version: String::new(),
            role: role.into(),
            pg_state: "running".into(),
            timeline: None,
            lag_bytes: None,
            last_report_ms: 0,
            agent_up: up,
            status: serde_json::Value::Null,
        }
    }

    fn cmd(node: Option<&str>) -> CommandRow {
        CommandRow {
            id: "c".into(),
            idempotency_key: "k".into(),
            cluster: "main".into(),
            node: node.map(String::from),
            kind: pgwarden_core::control::CommandKind::Pause,
            args: serde_json::json!({}),
            state: CommandPhase::Queued,
            message: String::new(),
            result: None,
            delivered_to: None,
            created_by: "u".into(),
            created_ms: 0,
            updated_ms: 0,
            deadline_ms: 0,
            attempts: 0,
        }
    }

    #[test]
    fn cluster_commands_try_live_agents_primary_first() {
        let nodes = vec![
            node("n1", "replica", true),
            node("n2", "primary", true),
            node("n3", "replica", false),
        ];
        let order: Vec<String> = targets(&cmd(None), &nodes)
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(order, vec!["n2", "n1", "n3"]);
        let only: Vec<String> = targets(&cmd(Some("n3")), &nodes)
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(only, vec!["n3"]);
    }
}
