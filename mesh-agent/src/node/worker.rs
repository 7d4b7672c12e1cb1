//! Applying the node's assignments (overlays, routing mesh, tasks) as the
//! managers' long poll hands them over, and reporting its tasks back.

use crate::locks::Locked;
use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use crate::api::parts;
use crate::{
    api::{
        error::ErrorKind,
        messages::{Assignments, PeerRequest, PeerResponse},
        service::TaskReport,
    },
    manager::ASSIGNMENTS_WAIT,
};

use super::Member;

impl Member {
    /// Follows this node's assignments (a long poll) and applies them.
    pub(super) async fn assignments_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut known = String::new();
        // The last answer, whole: its shared parts are named in the next
        // poll and put back into an answer that holds them back.
        let mut previous: Option<Assignments> = None;
        let mut warned = false;
        loop {
            let holds = previous.as_ref().map(parts::holds).unwrap_or_default();
            let request = || PeerRequest::Assignments {
                known: known.clone(),
                holds: holds.clone(),
            };
            let call = self.call_managers(request, ASSIGNMENTS_WAIT + Duration::from_secs(5), false);
            let reply = tokio::select! {
                r = call => r,
                _ = stop.changed() => return,
            };
            match reply {
                Ok(PeerResponse::Assignments(Ok(mut a))) => {
                    // The last answer is used up here, and replaced by this one below.
                    if let Err(e) = parts::restore(&mut a, previous.take()) {
                        // Ask again at once, naming nothing: the answer comes whole.
                        log::warn!("assignments: {e}; asking for them whole");
                        known.clear();
                        continue;
                    }
                    warned = false;
                    known = a.digest.clone();
                    *self.overlay_facts.locked() = super::metrics::overlay_facts(&a);
                    let started = std::time::Instant::now();
                    let overlays = self.overlays.apply(&a).await;
                    crate::metrics::record_reconcile("overlay", started, &overlays);
                    // The VIPs and published ports before the tasks: a new
                    // task's process connects at once, and a socket that
                    // connects before the socket programs serve its VIP
                    // keeps the VIP as its peer, which nothing answers.
                    let started = std::time::Instant::now();
                    // Tasks a previous agent left keep their backends.
                    self.tasks.adopt_addresses(&a.tasks).await;
                    let mesh = self.mesh.apply(&a).await;
                    crate::metrics::record_reconcile("mesh", started, &mesh);
                    if let Err(e) = &mesh {
                        log::warn!("routing mesh: {e}");
                    }
                    let started = std::time::Instant::now();
                    self.dns.apply(&a.services);
                    self.tasks.apply(&a.tasks, &a.retained);
                    crate::metrics::record_reconcile::<(), ()>("tasks", started, &Ok(()));
                    previous = Some(a);
                    if overlays.is_ok() && mesh.is_ok() {
                        continue;
                    }
                    // Ask again after the pause, whether or not anything changed.
                    known.clear();
                }
                Ok(other) if !warned => log::warn!("assignments: unexpected reply {other:?}"),
                Err(e) if !warned => log::warn!("assignments: {e}"),
                _ => {}
            }
            warned = true;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sends task reports to the managers in order, batching what queued
    /// up meanwhile and retrying until they are stored.
    pub(super) async fn report_loop(
        self: Arc<Self>,
        mut reports: mpsc::UnboundedReceiver<TaskReport>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut pending: Vec<TaskReport> = Vec::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    r = reports.recv() => match r {
                        Some(r) => pending.push(r),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
            while let Ok(r) = reports.try_recv() {
                pending.push(r);
            }
            let batch = || PeerRequest::ReportTasks(pending.clone());
            match self.call_managers(batch, Duration::from_secs(10), false).await {
                Ok(PeerResponse::Reported(Ok(()))) => {
                    pending.clear();
                    continue;
                }
                Ok(PeerResponse::Reported(Err(e))) if e.kind == ErrorKind::InvalidArgument => {
                    log::error!("the managers refused {} task reports: {e}", pending.len());
                    pending.clear();
                    continue;
                }
                Ok(other) => log::warn!("reporting tasks: unexpected reply {other:?}"),
                Err(e) => log::warn!("reporting tasks: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
