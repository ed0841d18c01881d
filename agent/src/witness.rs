//! A witness: an agent without PostgreSQL. It is a full member of the cluster's Raft group —
//! the third vote that lets a two-node cluster fail over — serves the health checks (all 503
//! but `/liveness`) and the API (operations are forwarded to the members that run them), and
//! reports its peers. It never takes the lease: the candidate rules refuse a witness.

use crate::agent::{OpError, OpRequest, Shared};
use crate::sys::now_ms;
use pgwarden_core::status::{PgState, Role};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub async fn run(shared: Arc<Shared>, mut ops: mpsc::Receiver<OpRequest>) {
    let cfg = shared.cfg.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(
            (cfg.node.loop_wait.0.as_millis() as u64 / 2).clamp(200, 2000),
        ))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(cfg.node.loop_wait.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            req = ops.recv() => {
                let Some(req) = req else { return };
                let _ = req.reply.send(Err(OpError::new(
                    409,
                    format!("{} is a witness: it runs no PostgreSQL", cfg.node.name),
                )));
            }
            _ = tick.tick() => {
                let mut peers = Vec::new();
                for m in cfg.peers() {
                    peers.push((m.clone(), crate::agent::fetch_status(&http, m).await));
                }
                if let Ok(mut p) = shared.peers.write() {
                    *p = peers;
                }
                let consensus = shared.consensus.info();
                if let Ok(mut s) = shared.status.write() {
                    s.name = cfg.node.name.clone();
                    s.cluster = cfg.cluster.name.clone();
                    s.witness = true;
                    s.role = Role::Unknown;
                    s.state = PgState::Stopped;
                    s.tags = cfg.tags.clone();
                    s.tags.nofailover = true;
                    s.consensus = Some(consensus);
                    s.agent_version = env!("CARGO_PKG_VERSION").into();
                    s.last_loop_ms = now_ms();
                }
            }
        }
    }
}
