//! The openraft type configuration shared by the store, the network and the
//! manager.

use crate::api::{
    objects::NodeId,
    store::{Command, CommandResponse},
};

openraft::declare_raft_types!(
    /// mesh's Raft: commands are [`Command`], node addresses are `host:port`.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
