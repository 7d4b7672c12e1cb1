//! `meshctl run --network NET -- CMD`: a one-off task on this node,
//! attached to attachable overlay networks, for debugging (Docker's
//! `docker run --network` on an attachable overlay). It is a service of
//! one task pinned to this node that is never restarted; its output is
//! streamed here, and the service is removed once the task ends, so it
//! leaves nothing behind. The exit code is 0 when the command succeeded
//! and 1 when it failed or could not start (the reason is printed).

use std::time::Duration;

use clap::Args;

use super::{network::networks, Client};
use crate::api::{
    error::{ApiError, ApiResult},
    messages::{ClusterRequest, ClusterResponse, LocalRequest, LocalResponse},
    objects::node_id_text,
    service::{parse_env, RestartCondition, ServiceSpec, TaskState},
};

/// `meshctl run` flags.
#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Name of the one-off service (default: run-XXXXXXXX).
    #[arg(long)]
    name: Option<String>,
    /// Attachable overlay network to attach (repeatable; at least one).
    #[arg(long, required = true)]
    network: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short, long)]
    env: Vec<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// How often the task's state and output are polled.
const POLL: Duration = Duration::from_millis(200);

/// Runs the one-off; an error when the command did not succeed.
pub(crate) async fn run(client: &Client, args: RunArgs) -> ApiResult<()> {
    for name in &args.network {
        let found = networks(
            client
                .cluster(ClusterRequest::NetworkInspect { network: name.clone() })
                .await?,
        )?;
        if let Some(n) = found.iter().find(|n| !n.network.attachable) {
            return Err(ApiError::precondition(format!(
                "network {} is not attachable: only services may use it; create one for debugging with `meshctl network create --attachable NAME`",
                n.network.name
            )));
        }
    }
    let node = client.info().await?.node_id.ok_or_else(|| {
        ApiError::precondition("this node is not part of a swarm: `meshctl swarm init` or `join` first")
    })?;
    let name = args
        .name
        .unwrap_or_else(|| format!("run-{:08x}", rand::random::<u32>()));
    let mut spec = ServiceSpec::new(name.clone(), args.command);
    spec.networks = args.network;
    spec.env = parse_env(&args.env).map_err(ApiError::invalid)?;
    spec.constraints = vec![format!("node.id=={}", node_id_text(node))];
    spec.restart.condition = RestartCondition::None;
    spec.validate().map_err(ApiError::invalid)?;
    client
        .cluster(ClusterRequest::ServiceCreate { spec: Box::new(spec) })
        .await?;
    let outcome = follow(client, &name).await;
    // Whatever happened, the one-off goes.
    let removed = client
        .cluster(ClusterRequest::ServiceRemove { service: name.clone() })
        .await;
    let (state, message) = outcome?;
    removed?;
    match state {
        TaskState::Complete => Ok(()),
        _ => Err(ApiError::internal(format!(
            "{name}: the task ended {}: {message}",
            state.name()
        ))),
    }
}

/// Streams the task's output until it ends; its final state and message.
async fn follow(client: &Client, service: &str) -> ApiResult<(TaskState, String)> {
    let mut cursors: Vec<(u64, u64)> = Vec::new();
    // What the task's state said last, told once (a start that waits for
    // its peers, or went ahead without them).
    let mut told = String::new();
    loop {
        let tasks = match client
            .cluster(ClusterRequest::TaskList {
                service: service.to_string(),
            })
            .await?
        {
            ClusterResponse::Tasks(t) => t,
            other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        };
        let ended = tasks
            .iter()
            .find(|t| t.task.state.is_terminal())
            .map(|t| (t.task.state, t.task.message.clone()));
        if let Some(t) = tasks.iter().find(|t| !t.task.state.is_terminal()) {
            if !t.task.message.is_empty() && t.task.message != told {
                told = t.task.message.clone();
                eprintln!("{service}: {}: {told}", t.task.state.name());
            }
        }
        let request = LocalRequest::ServiceLogs {
            service: service.to_string(),
            cursors: cursors.clone(),
            tail: None,
        };
        if let LocalResponse::Logs(chunks) = client.call(request).await? {
            for (_, chunk) in &chunks {
                print!("{}", chunk.text);
                match cursors.iter_mut().find(|(t, _)| *t == chunk.task) {
                    Some(c) => c.1 = chunk.next,
                    None => cursors.push((chunk.task, chunk.next)),
                }
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        // The last output was read after the task had ended.
        if let Some((state, message)) = ended {
            if state == TaskState::Complete && message != "finished" && (told.is_empty() || !message.contains(&told)) {
                eprintln!("{service}: {}: {message}", state.name());
            }
            return Ok((state, message));
        }
        tokio::time::sleep(POLL).await;
    }
}
