//! Node-to-node calls: a pool of mutual-TLS RPC clients keyed by address, and
//! openraft's network on top of it.

use crate::locks::Locked;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
    AnyError, BasicNode,
};
use rustls::{pki_types::ServerName, ClientConfig};

use crate::api::{
    messages::{PeerRequest, PeerResponse},
    raft_types::TypeConfig,
};
use crate::wire::tls::MANAGER_NAME;

use crate::wire::rpc::{RpcClient, RpcError};

use crate::api::objects::{node_id_text, NodeId};

/// A client for one peer.
pub(crate) type PeerClient = RpcClient<PeerRequest, PeerResponse>;

/// Connections to managers, shared by the session loop, forwarding and Raft.
pub(crate) struct Peers {
    tls: Mutex<Arc<ClientConfig>>,
    clients: Mutex<HashMap<String, PeerClient>>,
}

impl Peers {
    /// A pool whose connections present the node's certificate through `tls`.
    pub(crate) fn new(tls: Arc<ClientConfig>) -> Arc<Self> {
        Arc::new(Peers {
            tls: Mutex::new(tls),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// New credentials (renewal, promotion, CA rotation): later connections use them.
    pub(crate) fn set_tls(&self, tls: Arc<ClientConfig>) {
        *self.tls.locked() = tls;
        self.clients.locked().clear();
    }

    /// The client for the manager at `addr`.
    pub(crate) fn manager(&self, addr: &str) -> PeerClient {
        let mut clients = self.clients.locked();
        clients
            .entry(addr.to_string())
            .or_insert_with(|| {
                let tls = self.tls.locked().clone();
                RpcClient::new(
                    addr.to_string(),
                    tls,
                    ServerName::try_from(MANAGER_NAME).expect("reason: a valid DNS name"),
                )
            })
            .clone()
    }

    /// One call to node `id` (any role) at `addr`: the server must present
    /// that node's own certificate (`<id>.mesh-node`).
    pub(crate) async fn call_node(
        &self,
        id: NodeId,
        addr: &str,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, RpcError> {
        let name = format!("{}.mesh-node", node_id_text(id));
        let client = {
            let mut clients = self.clients.locked();
            clients
                .entry(format!("{name}@{addr}"))
                .or_insert_with(|| {
                    let tls = self.tls.locked().clone();
                    let server = ServerName::try_from(name.clone()).expect("reason: node IDs make valid DNS names");
                    RpcClient::new(addr.to_string(), tls, server)
                })
                .clone()
        };
        client.call(request, timeout).await
    }

    /// One call to the manager at `addr`.
    pub(crate) async fn call(
        &self,
        addr: &str,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, RpcError> {
        self.manager(addr).call(request, timeout).await
    }
}

/// openraft's view of the network.
pub(crate) struct RaftNet {
    /// The pool.
    pub(crate) peers: Arc<Peers>,
}

/// openraft's client for one target.
pub(crate) struct RaftPeer {
    target: NodeId,
    client: PeerClient,
}

impl RaftNetworkFactory<TypeConfig> for RaftNet {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        RaftPeer {
            target,
            client: self.peers.manager(&node.addr),
        }
    }
}

fn unexpected<E: std::error::Error>(what: PeerResponse) -> RPCError<NodeId, BasicNode, E> {
    let msg = match what {
        PeerResponse::Refused(e) => format!("refused: {e}"),
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Network(NetworkError::new(&AnyError::error(msg)))
}

impl RaftPeer {
    async fn send<E: std::error::Error>(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, RPCError<NodeId, BasicNode, E>> {
        self.client
            .call(request, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(PeerRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.send(PeerRequest::InstallSnapshot(rpc), &option).await? {
            PeerResponse::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }
}
