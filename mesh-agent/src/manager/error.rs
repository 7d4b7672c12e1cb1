//! What can fail in a manager itself (its store, its Raft instance), as
//! opposed to a request it refuses. It reaches `meshctl` as an internal
//! error of the request that met it, with this message.

use std::path::PathBuf;

use crate::{api::error::ApiError, manager::raft::store::StoreError};

/// A failure of the manager's own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ManagerError {
    /// The store's directory could not be made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The Raft log and state machine on disk.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Raft timing the agent was started with.
    #[error("invalid Raft timing: {0}")]
    Timing(String),
    /// Raft refused to start.
    #[error("starting Raft: {0}")]
    Raft(String),
    /// A change of the Raft members failed.
    #[error("changing the Raft members: {0}")]
    Membership(String),
}

impl From<ManagerError> for ApiError {
    fn from(error: ManagerError) -> ApiError {
        ApiError::internal(error.to_string())
    }
}
