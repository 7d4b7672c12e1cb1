//! Task logs: this node's tasks' logs, and a service's logs gathered
//! from every node that ran one of its tasks.

use std::{collections::BTreeMap, time::Duration};

use crate::agent::tasks::logs;
use crate::api::{
    error::{ApiError, ApiResult},
    messages::{ClusterRequest, ClusterResponse, LogChunk, LogQuery, PeerRequest, PeerResponse},
    objects::{node_id_text, NodeId},
};

use super::Member;

impl Member {
    /// Reads log text of tasks kept on this node.
    pub(super) fn read_logs(&self, query: &LogQuery) -> ApiResult<Vec<LogChunk>> {
        if query.tasks.len() > 1000 {
            return Err(ApiError::invalid("at most 1000 tasks per log query"));
        }
        query
            .tasks
            .iter()
            .map(|(task, from)| {
                let chunk = logs::read(&self.tasks.log_path(*task), *from, query.tail)
                    .map_err(|e| ApiError::internal(format!("reading task {}'s log: {e}", node_id_text(*task))))?;
                Ok(LogChunk {
                    task: *task,
                    text: chunk.text,
                    next: chunk.next,
                })
            })
            .collect()
    }

    /// `service logs`: finds the service's tasks and reads each one's log
    /// from its node, all nodes at once.
    pub(super) async fn service_logs(
        &self,
        service: &str,
        cursors: &[(u64, u64)],
        tail: Option<usize>,
    ) -> ApiResult<Vec<(String, LogChunk)>> {
        let ClusterResponse::Tasks(tasks) = self
            .cluster_request(ClusterRequest::TaskList {
                service: service.to_string(),
            })
            .await?
        else {
            return Err(ApiError::internal("unexpected reply to a task list"));
        };
        let ClusterResponse::Nodes(nodes) = self.cluster_request(ClusterRequest::NodeList).await? else {
            return Err(ApiError::internal("unexpected reply to a node list"));
        };
        let addr_of: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.node.id, n.node.addr.clone())).collect();
        let cursor: BTreeMap<u64, u64> = cursors.iter().copied().collect();
        let mut by_node: BTreeMap<NodeId, Vec<(u64, Option<u64>)>> = BTreeMap::new();
        let mut labels: BTreeMap<u64, String> = BTreeMap::new();
        for t in &tasks {
            let Some(node) = t.task.node else { continue };
            by_node
                .entry(node)
                .or_default()
                .push((t.task.id, cursor.get(&t.task.id).copied()));
            labels.insert(
                t.task.id,
                format!(
                    "{}.{}.{}@{}",
                    t.service_name,
                    if t.task.slot == 0 {
                        node_id_text(node)
                    } else {
                        t.task.slot.to_string()
                    },
                    node_id_text(t.task.id),
                    t.node_hostname.as_deref().unwrap_or("?")
                ),
            );
        }
        let calls = by_node.into_iter().filter_map(|(node, tasks)| {
            let addr = addr_of.get(&node)?.clone();
            let query = PeerRequest::ReadLogs(LogQuery { tasks, tail });
            Some(async move {
                let reply = self.peers.call_node(node, &addr, query, Duration::from_secs(10)).await;
                (addr, reply)
            })
        });
        let mut out = Vec::new();
        for (addr, reply) in futures::future::join_all(calls).await {
            match reply {
                Ok(PeerResponse::Logs(Ok(chunks))) => {
                    for c in chunks {
                        let label = labels.get(&c.task).cloned().unwrap_or_default();
                        out.push((label, c));
                    }
                }
                Ok(PeerResponse::Logs(Err(e)) | PeerResponse::Refused(e)) => {
                    log::warn!("logs from {addr}: {e}");
                }
                Ok(other) => log::warn!("logs from {addr}: unexpected reply {other:?}"),
                Err(e) => log::warn!("logs from {addr}: {e}"),
            }
        }
        Ok(out)
    }
}
