//! A manager's Raft storage: the log and the state machine in one redb file,
//! every value sealed with the data key.
//!
//! Tables: `log` (index -> sealed entry) and `meta` (name -> sealed value:
//! vote, committed, last purged log id, current snapshot). Keys (log
//! indices, names) stay in the clear; values never do. Each value is sealed
//! with its table and key as associated data, so a value moved to another
//! row does not open.
//!
//! The state machine lives in memory and is persisted by snapshots: on open
//! it is restored from the stored snapshot, and openraft re-applies the
//! committed entries after it (we persist `committed` for that).
//!
//! Every read and write of the file (an fsync per commit, snapshots of
//! megabytes) runs on a blocking thread (`on_disk`), not on the agent's
//! two runtime workers, where it held up the RPC server and heartbeats.

use crate::locks::Locked;
use std::{
    fmt::Debug,
    io::Cursor,
    ops::RangeBounds,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use openraft::{
    storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine, Snapshot},
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::raft_types::TypeConfig;
use crate::manager::state::Apply;

use crate::ca::seal::DataKey;

use crate::api::{
    objects::NodeId,
    store::{ClusterState, CommandResponse},
};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// redb failed.
    #[error("raft store: {0}")]
    Db(String),
    /// A value did not decrypt.
    #[error("raft store cannot be decrypted ({0}): wrong data key or tampered file")]
    Sealed(String),
    /// A value decrypted but did not decode.
    #[error("raft store holds an undecodable value at {0}: {1}")]
    Decode(String, String),
}

/// Runs `f` with the store on a blocking thread.
async fn on_disk<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared))
        .await
        .map_err(|e| StoreError::Db(format!("the storage thread stopped: {e}")))?
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

fn io(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: StoreError) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// The shared database and key.
struct Shared {
    db: Database,
    dek: DataKey,
}

impl Shared {
    fn seal<T: Serialize>(&self, aad: &str, value: &T) -> Result<Vec<u8>, StoreError> {
        let bytes = rmp_serde::to_vec(value).map_err(|e| StoreError::Decode(aad.into(), e.to_string()))?;
        Ok(self.dek.seal(aad.as_bytes(), &bytes))
    }

    fn open<T: DeserializeOwned>(&self, aad: &str, sealed: &[u8]) -> Result<T, StoreError> {
        let bytes = self
            .dek
            .open(aad.as_bytes(), sealed)
            .map_err(|_| StoreError::Sealed(aad.into()))?;
        rmp_serde::from_slice(&bytes).map_err(|e| StoreError::Decode(aad.into(), e.to_string()))
    }

    fn get_meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let aad = format!("meta/{name}");
        match table.get(name).map_err(db_err)? {
            Some(v) => self.open(&aad, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let sealed = self.seal(&format!("meta/{name}"), value)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(META).map_err(db_err)?;
            table.insert(name, sealed.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn entry(&self, index: u64, sealed: &[u8]) -> Result<Entry<TypeConfig>, StoreError> {
        self.open(&format!("log/{index}"), sealed)
    }

    fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = match txn.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
            Err(e) => return Err(db_err(e)),
        };
        let mut out = Vec::new();
        for item in table.range(range).map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(self.entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn last_entry(&self) -> Result<Option<Entry<TypeConfig>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = match txn.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let last = table.last().map_err(db_err)?;
        let result = match last {
            Some((k, v)) => self.entry(k.value(), v.value()).map(Some),
            None => Ok(None),
        };
        result
    }
}

/// Opens (or creates) the store at `path`, sealed with `dek`.
pub(crate) fn open(path: &Path, dek: DataKey) -> Result<(LogStore, StateMachineStore), StoreError> {
    let db = Database::create(path).map_err(db_err)?;
    {
        // Create the tables up front so readers never see them missing.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(LOG).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
    }
    let shared = Arc::new(Shared { db, dek });
    // Reading the vote checks the key before anything else runs.
    shared.get_meta::<Vote<NodeId>>("vote")?;
    let stored = shared.get_meta::<StoredSnapshot>("snapshot")?;
    let snapshot_bytes = stored.as_ref().map_or(0, |s| s.data.len() as u64);
    let data = match stored {
        Some(s) => rmp_serde::from_slice(&s.data).map_err(|e| StoreError::Decode("snapshot".into(), e.to_string()))?,
        None => SmData::default(),
    };
    let (applied, _) = watch::channel(data.last_applied.map(|l| l.index).unwrap_or(0));
    let sm = StateMachineStore {
        shared: shared.clone(),
        data: Arc::new(std::sync::Mutex::new(data)),
        applied: Arc::new(applied),
        snapshot_bytes: Arc::new(AtomicU64::new(snapshot_bytes)),
    };
    Ok((LogStore { shared }, sm))
}

/// The latest state in a store, for `--force-new-cluster`: the stored
/// snapshot with every committed log entry after it applied.
pub(crate) fn recover(path: &Path, dek: DataKey) -> Result<ClusterState, StoreError> {
    let (log, sm) = open(path, dek)?;
    let mut data = sm.data.locked().clone();
    let committed: Option<Option<LogId<NodeId>>> = log.shared.get_meta("committed")?;
    let Some(committed) = committed.flatten() else {
        return Ok((*data.state).clone());
    };
    let from = data.last_applied.map(|l| l.index + 1).unwrap_or(0);
    for entry in log.shared.entries(from..=committed.index)? {
        if let EntryPayload::Normal(command) = &entry.payload {
            Arc::make_mut(&mut data.state).apply(command);
        }
    }
    Ok((*data.state).clone())
}

/// The Raft log half.
#[derive(Clone)]
pub(crate) struct LogStore {
    shared: Arc<Shared>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        on_disk(&self.shared, move |s| s.entries(range))
            .await
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let read = |e| io(ErrorSubject::Logs, ErrorVerb::Read, e);
        let (last_purged_log_id, last) = on_disk(&self.shared, |s| {
            let purged: Option<LogId<NodeId>> = s.get_meta("last_purged")?;
            Ok((purged, s.last_entry()?.map(|e| e.log_id)))
        })
        .await
        .map_err(read)?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        on_disk(&self.shared, move |s| s.put_meta("vote", &vote))
            .await
            .map_err(|e| io(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        on_disk(&self.shared, |s| s.get_meta("vote"))
            .await
            .map_err(|e| io(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        on_disk(&self.shared, move |s| s.put_meta("committed", &committed))
            .await
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let v: Option<Option<LogId<NodeId>>> = on_disk(&self.shared, |s| s.get_meta("committed"))
            .await
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(v.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        on_disk(&self.shared, move |s| s.write_entries(entries))
            .await
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        on_disk(&self.shared, move |s| s.delete(log_id.index.., None))
            .await
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        on_disk(&self.shared, move |s| s.delete(..=log_id.index, Some(log_id)))
            .await
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

impl Shared {
    /// Writes entries in one transaction; returns once it is durable (redb
    /// commits with fsync), so `append` may tell openraft they are flushed.
    fn write_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(db_err)?;
            for entry in entries {
                let index = entry.log_id.index;
                let sealed = self.seal(&format!("log/{index}"), &entry)?;
                table.insert(index, sealed.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Deletes a range of entries and, for a purge, records the purged id in
    /// the same transaction.
    fn delete<R: RangeBounds<u64>>(&self, range: R, purged: Option<LogId<NodeId>>) -> Result<(), StoreError> {
        let sealed = purged.map(|p| self.seal("meta/last_purged", &p)).transpose()?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(db_err)?;
            table.retain_in(range, |_, _| false).map_err(db_err)?;
            if let Some(sealed) = &sealed {
                let mut meta = txn.open_table(META).map_err(db_err)?;
                meta.insert("last_purged", sealed.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }
}

/// What a snapshot holds.
#[derive(Serialize, Deserialize, Clone, Default)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    state: Arc<ClusterState>,
}

/// The stored current snapshot.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine half.
#[derive(Clone)]
pub(crate) struct StateMachineStore {
    shared: Arc<Shared>,
    data: Arc<std::sync::Mutex<SmData>>,
    applied: Arc<watch::Sender<u64>>,
    /// Size of the current snapshot (its encoding, before sealing).
    snapshot_bytes: Arc<AtomicU64>,
}

impl StateMachineStore {
    /// Size in bytes of the current snapshot, 0 before the first.
    pub(crate) fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// The state as applied here (cheap: shared until the next apply).
    pub(crate) fn state(&self) -> Arc<ClusterState> {
        self.data.locked().state.clone()
    }

    /// The index of the last applied entry, updated after every apply.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

impl Shared {
    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        Ok(self.get_meta::<StoredSnapshot>("snapshot")?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = self.data.locked().clone();
        let write = |e| io(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
        let encoded = data.clone();
        let bytes = on_disk(&self.shared, move |_| {
            rmp_serde::to_vec(&encoded).map_err(|e| StoreError::Decode("snapshot".into(), e.to_string()))
        })
        .await
        .map_err(write)?;
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, rand::random::<u32>()),
            None => format!("empty-{}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes.clone(),
        };
        on_disk(&self.shared, move |s| s.put_meta("snapshot", &stored))
            .await
            .map_err(write)?;
        self.snapshot_bytes.store(bytes.len() as u64, Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let data = self.data.locked();
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut data = self.data.locked();
        let mut out = Vec::new();
        for entry in entries {
            data.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => CommandResponse::Applied,
                EntryPayload::Normal(command) => Arc::make_mut(&mut data.state).apply(&command),
                EntryPayload::Membership(m) => {
                    data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResponse::Applied
                }
            });
        }
        let index = data.last_applied.map(|l| l.index).unwrap_or(0);
        drop(data);
        self.applied.send_replace(index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        self.snapshot_bytes.store(bytes.len() as u64, Ordering::Relaxed);
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        // Decoded first: a snapshot that does not decode is not stored.
        let data: SmData = on_disk(&self.shared, move |s| {
            let data = rmp_serde::from_slice(&stored.data)
                .map_err(|e| StoreError::Decode("snapshot".into(), e.to_string()))?;
            s.put_meta("snapshot", &stored)?;
            Ok(data)
        })
        .await
        .map_err(|e| io(subject, ErrorVerb::Write, e))?;
        let index = data.last_applied.map(|l| l.index).unwrap_or(0);
        *self.data.locked() = data;
        self.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        on_disk(&self.shared, |s| s.current_snapshot())
            .await
            .map_err(|e| io(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use openraft::{testing::StoreBuilder, CommittedLeaderId};

    use super::*;
    use crate::api::{
        objects::{CaState, ClusterSpec, JoinTokens},
        store::Command,
    };

    fn temp(name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-store-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, PathBuf> for Builder {
        async fn build(&self) -> Result<(PathBuf, LogStore, StateMachineStore), StorageError<NodeId>> {
            let dir = temp("suite");
            let (log, sm) = open(&dir.join("raft.redb"), DataKey::generate()).expect("open");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn passes_openraft_conformance_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }

    fn entry(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn init_command() -> Command {
        Command::Init {
            cluster: ClusterSpec {
                id: "cluster-marker".into(),
                created_at: 1,
                default_addr_pool: vec!["10.0.0.0/8".into()],
                default_addr_pool_mask_len: 24,
                autolock: true,
                heartbeat_period_ms: 1000,
                heartbeat_misses_down: 3,
                cert_expiry_secs: 3600,
                task_history_limit: 5,
                data_path_port: 4789,
                overlay_key_rotation_secs: 3600,
            },
            ca: CaState {
                root_cert_pem: "CERT".into(),
                root_key_pem: "-----BEGIN PRIVATE KEY-----MARKERKEY".into(),
                previous_roots_pem: vec![],
                previous_until: 0,
                cross_signed_pem: String::new(),
            },
            tokens: JoinTokens {
                worker: "MESHTKN-1-markertoken".into(),
                manager: "MESHTKN-1-markermanager".into(),
            },
            unlock_key: Some("MESHKEY-1-markerunlock".into()),
            first: Box::new(crate::api::objects::Node {
                id: 1,
                hostname: "markerhost".into(),
                role: crate::api::objects::Role::Manager,
                availability: crate::api::objects::Availability::Active,
                labels: Default::default(),
                addr: "192.0.2.1:2377".into(),
                data_path_addr: "192.0.2.1".into(),
                status: crate::api::objects::NodeStatus::Ready,
                status_message: String::new(),
                agent_version: "0".into(),
                wireguard_key: String::new(),
                resources: Default::default(),
                certs: Default::default(),
                created_at: 1,
                updated_at: 1,
            }),
        }
    }

    /// `LogFlushed` cannot be built outside openraft 0.9, so tests append
    /// through the function `append` itself uses.
    async fn append(log: &mut LogStore, entries: Vec<Entry<TypeConfig>>) {
        log.shared.write_entries(entries).unwrap();
    }

    #[tokio::test]
    async fn survives_reopen_and_leaves_no_plaintext() {
        let dir = temp("reopen");
        let path = dir.join("raft.redb");
        let dek = DataKey::generate();
        {
            let (mut log, mut sm) = open(&path, dek.clone()).unwrap();
            // A real log starts at index 0 (openraft checks that on start-up).
            let blank = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 0),
                payload: EntryPayload::Blank,
            };
            let entries = vec![blank, entry(1, 1, init_command())];
            append(&mut log, entries.clone()).await;
            log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
            log.save_committed(Some(entries[1].log_id)).await.unwrap();
            sm.apply(entries).await.unwrap();
            sm.build_snapshot().await.unwrap();
            assert_eq!(*sm.subscribe().borrow(), 1);
        }
        {
            let (mut log, mut sm) = open(&path, dek.clone()).unwrap();
            assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
            assert_eq!(log.read_committed().await.unwrap().map(|l| l.index), Some(1));
            assert_eq!(log.get_log_state().await.unwrap().last_log_id.map(|l| l.index), Some(1));
            let (applied, _) = sm.applied_state().await.unwrap();
            assert_eq!(applied.map(|l| l.index), Some(1));
            assert_eq!(sm.state().cluster.as_ref().unwrap().id, "cluster-marker");
            assert!(sm.get_current_snapshot().await.unwrap().is_some());
            // Committed but after the snapshot: recover() applies it too.
            let later = vec![entry(
                1,
                2,
                Command::RotateToken {
                    role: crate::api::objects::Role::Worker,
                    token: "T2".into(),
                },
            )];
            append(&mut log, later.clone()).await;
            log.save_committed(Some(later[0].log_id)).await.unwrap();
        }
        assert_eq!(recover(&path, dek.clone()).unwrap().tokens.worker, "T2");
        // openraft's own start-up path re-applies it from the log too.
        {
            let (mut log, mut sm) = open(&path, dek.clone()).unwrap();
            openraft::StorageHelper::new(&mut log, &mut sm)
                .get_initial_state()
                .await
                .unwrap();
            assert_eq!(sm.state().tokens.worker, "T2");
            assert_eq!(*sm.subscribe().borrow(), 2);
        }
        let raw = std::fs::read(&path).unwrap();
        for marker in [
            "MARKERKEY",
            "BEGIN PRIVATE KEY",
            "markertoken",
            "markermanager",
            "markerunlock",
            "markerhost",
            "cluster-marker",
        ] {
            assert!(
                !raw.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{marker} in plain text"
            );
        }
        // Another key opens nothing.
        match open(&path, DataKey::generate()) {
            Err(e) => assert!(e.to_string().contains("wrong data key"), "{e}"),
            Ok(_) => panic!("opened with the wrong key"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn purge_removes_entries_for_good() {
        let dir = temp("purge");
        let path = dir.join("raft.redb");
        let dek = DataKey::generate();
        {
            let (mut log, _) = open(&path, dek.clone()).unwrap();
            let entries: Vec<_> = (1..=10).map(|i| entry(1, i, Command::RemoveNode { id: i })).collect();
            append(&mut log, entries).await;
            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 6)).await.unwrap();
            assert!(log.try_get_log_entries(0..=6).await.unwrap().is_empty());
            assert_eq!(log.try_get_log_entries(0..).await.unwrap().len(), 4);
        }
        let (mut log, _) = open(&path, dek).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(6));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(10));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_value_moved_to_another_row_does_not_open() {
        let dir = temp("moved");
        let path = dir.join("raft.redb");
        let (mut log, _) = open(&path, DataKey::generate()).unwrap();
        append(&mut log, vec![entry(1, 1, Command::RemoveNode { id: 1 })]).await;
        let txn = log.shared.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(LOG).unwrap();
            let sealed = table.get(1).unwrap().unwrap().value().to_vec();
            table.insert(2, sealed.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(log.try_get_log_entries(1..2).await.unwrap().len(), 1);
        let err = log.try_get_log_entries(2..3).await.unwrap_err();
        assert!(err.to_string().contains("wrong data key"), "{err}");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A single voter never sends RPCs; the network only has to exist.
    struct NoNetwork;

    fn unreachable<E: std::error::Error>() -> openraft::error::RPCError<NodeId, BasicNode, E> {
        openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(&AnyError::error("single node")))
    }

    impl openraft::RaftNetworkFactory<TypeConfig> for NoNetwork {
        type Network = NoNetwork;

        async fn new_client(&mut self, _: NodeId, _: &BasicNode) -> NoNetwork {
            NoNetwork
        }
    }

    impl openraft::RaftNetwork<TypeConfig> for NoNetwork {
        async fn append_entries(
            &mut self,
            _: openraft::raft::AppendEntriesRequest<TypeConfig>,
            _: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::AppendEntriesResponse<NodeId>,
            openraft::error::RPCError<NodeId, BasicNode, openraft::error::RaftError<NodeId>>,
        > {
            Err(unreachable())
        }

        async fn install_snapshot(
            &mut self,
            _: openraft::raft::InstallSnapshotRequest<TypeConfig>,
            _: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            openraft::error::RPCError<
                NodeId,
                BasicNode,
                openraft::error::RaftError<NodeId, openraft::error::InstallSnapshotError>,
            >,
        > {
            Err(unreachable())
        }

        async fn vote(
            &mut self,
            _: openraft::raft::VoteRequest<NodeId>,
            _: openraft::network::RPCOption,
        ) -> Result<
            openraft::raft::VoteResponse<NodeId>,
            openraft::error::RPCError<NodeId, BasicNode, openraft::error::RaftError<NodeId>>,
        > {
            Err(unreachable())
        }
    }

    async fn start_raft(path: &Path, dek: DataKey) -> (openraft::Raft<TypeConfig>, StateMachineStore) {
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let (log, sm) = open(path, dek).unwrap();
        let raft = openraft::Raft::new(1, Arc::new(config), NoNetwork, log, sm.clone())
            .await
            .unwrap();
        (raft, sm)
    }

    /// The whole path through a real `Raft`: appends flushed through the
    /// callback, `committed` saved, a snapshot built; after a restart the
    /// entries committed after the snapshot are re-applied from the log.
    #[tokio::test]
    async fn a_restarted_raft_reapplies_what_was_committed_after_the_snapshot() {
        let dir = temp("raft");
        let path = dir.join("raft.redb");
        let dek = DataKey::generate();
        let worker = |token: &str| Command::RotateToken {
            role: crate::api::objects::Role::Worker,
            token: token.into(),
        };
        let (snapshot_index, last_index) = {
            let (raft, sm) = start_raft(&path, dek.clone()).await;
            let members = [(1, BasicNode::new("127.0.0.1:1"))]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>();
            raft.initialize(members).await.unwrap();
            raft.client_write(init_command()).await.unwrap();
            raft.client_write(worker("T1")).await.unwrap();
            raft.trigger().snapshot().await.unwrap();
            let metrics = raft
                .wait(Some(std::time::Duration::from_secs(10)))
                .metrics(|m| m.snapshot.is_some(), "snapshot built")
                .await
                .unwrap();
            let snapshot_index = metrics.snapshot.unwrap().index;
            let last = raft.client_write(worker("T2")).await.unwrap().log_id.index;
            assert!(last > snapshot_index);
            assert_eq!(*sm.subscribe().borrow(), last);
            raft.shutdown().await.unwrap();
            (snapshot_index, last)
        };
        let (raft, sm) = start_raft(&path, dek).await;
        // Raft::new has already re-applied the log after the snapshot.
        assert_eq!(sm.state().tokens.worker, "T2");
        assert_eq!(sm.state().cluster.as_ref().unwrap().id, "cluster-marker");
        assert!(*sm.subscribe().borrow() >= last_index);
        let snapshot = sm.clone().get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(snapshot_index));
        raft.shutdown().await.unwrap();
        drop((raft, sm));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The real log, whose writes fail once `fail` is set (a full or
    /// failing disk).
    #[derive(Clone)]
    struct FailingLog {
        inner: LogStore,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl RaftLogReader<TypeConfig> for FailingLog {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
            &mut self,
            range: RB,
        ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
            self.inner.try_get_log_entries(range).await
        }
    }

    impl RaftLogStorage<TypeConfig> for FailingLog {
        type LogReader = Self;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
            self.inner.get_log_state().await
        }

        async fn get_log_reader(&mut self) -> Self::LogReader {
            self.clone()
        }

        async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
            self.inner.save_vote(vote).await
        }

        async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
            self.inner.read_vote().await
        }

        async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
        where
            I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            if self.fail.load(Ordering::Relaxed) {
                return Err(io(
                    ErrorSubject::Logs,
                    ErrorVerb::Write,
                    StoreError::Db("No space left on device".into()),
                ));
            }
            self.inner.append(entries, callback).await
        }

        async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            self.inner.truncate(log_id).await
        }

        async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
            self.inner.purge(log_id).await
        }
    }

    /// A storage error stops the Raft core; the manager hears why (and
    /// exits on it) instead of running on with a core that answers nothing.
    #[tokio::test]
    async fn a_storage_error_that_stops_the_raft_core_is_reported() {
        let dir = temp("fatal");
        let (log, sm) = open(&dir.join("raft.redb"), DataKey::generate()).unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log = FailingLog {
            inner: log,
            fail: fail.clone(),
        };
        let config = openraft::Config::default().validate().unwrap();
        let raft = openraft::Raft::new(1, Arc::new(config), NoNetwork, log, sm)
            .await
            .unwrap();
        let members = [(1, BasicNode::new("127.0.0.1:1"))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        raft.initialize(members).await.unwrap();
        raft.client_write(init_command()).await.unwrap();
        let watching = tokio::spawn(crate::manager::core_failure(raft.metrics()));
        fail.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            raft.client_write(Command::RotateToken {
                role: crate::api::objects::Role::Worker,
                token: "T1".into(),
            }),
        )
        .await;
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), watching)
            .await
            .expect("the core stops on the failed write")
            .unwrap()
            .expect("a failure, not a requested stop");
        assert!(why.contains("No space left on device"), "{why}");
        // A core told to stop is no failure.
        let stopped = temp("stopped");
        let (log, sm) = open(&stopped.join("raft.redb"), DataKey::generate()).unwrap();
        let config = openraft::Config::default().validate().unwrap();
        let raft = openraft::Raft::new(1, Arc::new(config), NoNetwork, log, sm)
            .await
            .unwrap();
        let watching = tokio::spawn(crate::manager::core_failure(raft.metrics()));
        raft.shutdown().await.unwrap();
        assert_eq!(watching.await.unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(stopped).unwrap();
    }
}
