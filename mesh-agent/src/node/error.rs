//! What can fail on the node itself (its files, keys, certificates, the
//! host), as opposed to what the managers answer. It reaches `meshctl` as
//! an internal error of the request that met it, with this message.

use std::path::PathBuf;

use crate::{
    api::error::ApiError,
    ca::{keystore::KeyStoreError, pki::PkiError},
    wire::tls::TlsError,
};

/// A failure of the node's own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something other than what the node wrote there.
    #[error("{what} is corrupt: {reason}")]
    Corrupt {
        /// The file, or what it holds.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key files (DEK, KEK, unlock key).
    #[error(transparent)]
    Keys(#[from] KeyStoreError),
    /// Making or reading a key or certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Building the TLS configurations from the node's credentials.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl NodeError {
    /// An IO failure on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NodeError {
        let path = path.into();
        move |source| NodeError::Io { path, source }
    }

    /// `what` does not hold what the node wrote there.
    pub(crate) fn corrupt(what: impl Into<String>, reason: impl ToString) -> NodeError {
        NodeError::Corrupt {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> ApiError {
        ApiError::internal(error.to_string())
    }
}
