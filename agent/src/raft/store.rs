//! Durable storage for the replicated log, in the agent's state directory:
//!
//! - `raft/vote.json`, `raft/committed.json`: written atomically and fsynced;
//! - `raft/log.jsonl`: one entry per line, appended and fsynced before openraft is told the
//!   entries are durable; rewritten (atomically) on truncation and purge;
//! - `raft/purged.json`: the last purged log id;
//! - `raft/snapshot.json`: the latest snapshot (the state machine's data and its metadata).
//!
//! The state machine itself lives in memory and is rebuilt from the snapshot plus the log on
//! start, which is why the log is purged only up to what a snapshot contains.

use super::{Applied, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use pgwarden_core::lease::ClusterState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

type NodeId = u64;
type SErr = StorageError<NodeId>;

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn to_json<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

struct LogInner {
    dir: PathBuf,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
}

impl LogInner {
    fn log_path(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }

    fn rewrite_log(&self) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for e in self.entries.values() {
            buf.extend(to_json(e)?);
            buf.push(b'\n');
        }
        write_file(&self.log_path(), &buf)
    }
}

/// The log store. Clones share the same log (one is handed to openraft as the reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

fn lock_err<T>(_: T) -> SErr {
    StorageIOError::read_logs(&std::io::Error::other("log store lock poisoned")).into()
}

impl LogStore {
    /// Opens (or creates) the log under `dir`.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let vote = read_json(&dir.join("vote.json"))?;
        let committed = read_json(&dir.join("committed.json"))?.flatten();
        let last_purged = read_json(&dir.join("purged.json"))?.flatten();
        let mut entries = BTreeMap::new();
        match std::fs::read_to_string(dir.join("log.jsonl")) {
            Ok(text) => {
                for line in text.lines() {
                    match serde_json::from_str::<Entry<TypeConfig>>(line) {
                        Ok(e) => {
                            entries.insert(e.log_id.index, e);
                        }
                        // A torn last line (crash during append) was never acknowledged.
                        Err(_) => break,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                vote,
                committed,
                last_purged,
                entries,
            })),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let g = self.inner.lock().map_err(lock_err)?;
        Ok(g.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let g = self.inner.lock().map_err(lock_err)?;
        let last = g.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: last.or(g.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        let mut g = self.inner.lock().map_err(lock_err)?;
        let bytes = to_json(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        write_file(&g.dir.join("vote.json"), &bytes).map_err(|e| StorageIOError::write_vote(&e))?;
        g.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        Ok(self.inner.lock().map_err(lock_err)?.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        let mut g = self.inner.lock().map_err(lock_err)?;
        let bytes = to_json(&committed).map_err(|e| StorageIOError::write(&e))?;
        write_file(&g.dir.join("committed.json"), &bytes).map_err(|e| StorageIOError::write(&e))?;
        g.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.inner.lock().map_err(lock_err)?.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.inner.lock().map_err(lock_err)?;
        let mut buf = Vec::new();
        let mut new = Vec::new();
        for e in entries {
            buf.extend(to_json(&e).map_err(|e| StorageIOError::write_logs(&e))?);
            buf.push(b'\n');
            new.push(e);
        }
        let res = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(g.log_path())?;
            f.write_all(&buf)?;
            f.sync_all()
        })();
        match res {
            Ok(()) => {
                for e in new {
                    g.entries.insert(e.log_id.index, e);
                }
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let mut g = self.inner.lock().map_err(lock_err)?;
        g.entries.retain(|&i, _| i < log_id.index);
        g.rewrite_log()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let mut g = self.inner.lock().map_err(lock_err)?;
        let bytes = to_json(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        write_file(&g.dir.join("purged.json"), &bytes)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        g.last_purged = Some(log_id);
        g.entries.retain(|&i, _| i > log_id.index);
        g.rewrite_log()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// The state machine's data: what a snapshot holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    pub state: ClusterState,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

struct SmInner {
    dir: PathBuf,
    data: SmData,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

/// The state machine. Clones share it; `state()` gives the agent a copy of the lease state.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

fn sm_lock_err<T>(_: T) -> SErr {
    StorageIOError::read_state_machine(&std::io::Error::other("state machine lock poisoned")).into()
}

impl StateMachine {
    /// Opens the state machine under `dir`, restored from its latest snapshot. The lease rules
    /// use the clock-drift bound of the replicated configuration, so every member applies a
    /// proposal the same way.
    pub fn open(dir: &Path) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let snapshot: Option<StoredSnapshot> = read_json(&dir.join("snapshot.json"))?;
        let data = match &snapshot {
            Some(s) => serde_json::from_slice(&s.data)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            None => SmData::default(),
        };
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(SmInner {
                dir: dir.to_path_buf(),
                data,
                snapshot,
                snapshot_seq: 0,
            })),
        })
    }

    /// The replicated state as this member has applied it.
    pub fn state(&self) -> ClusterState {
        self.inner
            .lock()
            .map(|g| g.data.state.clone())
            .unwrap_or_default()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let mut g = self.inner.lock().map_err(sm_lock_err)?;
        let data = to_json(&g.data).map_err(|e| StorageIOError::read_state_machine(&e))?;
        g.snapshot_seq += 1;
        let snapshot_id = match g.data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, g.snapshot_seq),
            None => format!("none-{}", g.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: g.data.last_applied,
            last_membership: g.data.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = to_json(&stored).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        write_file(&g.dir.join("snapshot.json"), &bytes)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        g.snapshot = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let g = self.inner.lock().map_err(sm_lock_err)?;
        Ok((g.data.last_applied, g.data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.inner.lock().map_err(sm_lock_err)?;
        let mut out = Vec::new();
        for e in entries {
            g.data.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied(Ok(()))),
                EntryPayload::Normal(p) => {
                    let drift = g.data.state.config.failover.drift_ms();
                    let r = g.data.state.apply(&p, drift);
                    out.push(Applied(r));
                }
                EntryPayload::Membership(m) => {
                    g.data.last_membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied(Ok(())));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let data: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut g = self.inner.lock().map_err(sm_lock_err)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let file = to_json(&stored).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        write_file(&g.dir.join("snapshot.json"), &file)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        g.data = SmData {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state: data.state,
        };
        g.snapshot = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let g = self.inner.lock().map_err(sm_lock_err)?;
        Ok(g.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    /// Removes the test's directory when the suite is done with it.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, Dir> for Builder {
        async fn build(&self) -> Result<(Dir, LogStore, StateMachine), SErr> {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir =
                std::env::temp_dir().join(format!("pgwarden-raft-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let log = LogStore::open(&dir).map_err(|e| StorageIOError::read_logs(&e))?;
            let sm =
                StateMachine::open(&dir).map_err(|e| StorageIOError::read_state_machine(&e))?;
            Ok((Dir(dir), log, sm))
        }
    }

    #[test]
    fn openraft_storage_conformance_suite() {
        Suite::test_all(Builder).unwrap();
    }

    #[tokio::test]
    async fn log_vote_and_snapshot_survive_a_restart() {
        use pgwarden_core::lease::Proposal;
        let dir =
            std::env::temp_dir().join(format!("pgwarden-raft-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _guard = Dir(dir.clone());
        let lid = |term, index| LogId::new(openraft::CommittedLeaderId::new(term, 1), index);
        {
            let mut log = LogStore::open(&dir).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            let mut sm = StateMachine::open(&dir).unwrap();
            let acquire = Entry::<TypeConfig> {
                log_id: lid(3, 1),
                payload: EntryPayload::Normal(Proposal::Acquire {
                    node: "n1".into(),
                    epoch: 1,
                    now_ms: 1000,
                    ttl_ms: 5000,
                    reason: "bootstrap".into(),
                    manual: false,
                    record: None,
                }),
            };
            // Append through the in-memory path the way openraft does, then apply.
            {
                let mut g = log.inner.lock().unwrap();
                g.entries.insert(1, acquire.clone());
                g.rewrite_log().unwrap();
            }
            let r = sm.apply(vec![acquire]).await.unwrap();
            assert_eq!(r, vec![Applied(Ok(()))]);
            sm.build_snapshot().await.unwrap();
        }
        let mut log = LogStore::open(&dir).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id, Some(lid(3, 1)));
        let sm = StateMachine::open(&dir).unwrap();
        let lease = sm.state().lease.unwrap();
        assert_eq!((lease.holder.as_str(), lease.epoch), ("n1", 1));
    }
}
