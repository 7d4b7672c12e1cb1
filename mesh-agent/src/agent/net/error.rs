//! What can fail when a node programs its tasks' networks.

/// A failure to bring a network, the tunnel or IPsec in line, or to put a
/// task on its networks.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetError {
    /// The node is leaving the swarm: nothing new is attached.
    #[error("this node is leaving the swarm")]
    Leaving,
    /// Overlays need an IPv4 data-path address, and the node has none.
    #[error("this node has no IPv4 data-path address, so it cannot join overlay networks")]
    NoDataPathAddress,
    /// An encrypted network's carrier (the WireGuard tunnel or IPsec) is
    /// not up; the message says which and why.
    #[error("{0}")]
    CarrierMissing(String),
    /// The kernel cannot do IPsec (XFRM netlink, ESP, AES-GCM), and why.
    #[error("{0}")]
    NoIpsec(String),
    /// Another call holds the carrier (the tunnel or IPsec).
    #[error("{0} is busy")]
    Busy(&'static str),
    /// The thread doing the work stopped (it panicked).
    #[error("{what} worker: {source}")]
    Worker {
        /// What it was working on.
        what: &'static str,
        /// How it stopped.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The kernel refused, or could not be asked.
    #[error("{doing}: {source}")]
    Kernel {
        /// What the node was doing.
        doing: String,
        /// The mechanism's own error (netlink, XFRM, WireGuard, nf_tables, a namespace).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NetError {
    /// A kernel failure while `doing`.
    pub(crate) fn kernel<E>(doing: impl Into<String>) -> impl FnOnce(E) -> NetError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let doing = doing.into();
        move |source| NetError::Kernel {
            doing,
            source: Box::new(source),
        }
    }
}
