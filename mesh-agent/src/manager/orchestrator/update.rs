//! Rolling updates (pure): which outdated tasks to replace now, in batches
//! of `--update-parallelism` with `--update-delay` between them, and what a
//! failed new task does to the update (pause, continue, roll back).
//!
//! The scheduler does the replacing: stop-first shuts an old task down and
//! keeps its place empty until it has stopped; start-first hides the old
//! task from the scheduler, which then places a new one beside it, and
//! shuts the old one down once the new one runs.

use std::collections::BTreeSet;

use crate::api::service::{
    place_of, DesiredState, FailureAction, Place, Service, Task, TaskState, UpdateOrder, UpdateState,
};

use crate::api::objects::NodeId;

/// The updater's verdict for one service.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct UpdateStep {
    /// Places the scheduler must leave empty for now (old tasks stopping).
    pub(crate) resting: BTreeSet<Place>,
    /// Old tasks the scheduler must not see (replaced start-first).
    pub(crate) hidden: BTreeSet<u64>,
    /// Old tasks to shut down.
    pub(crate) shutdown: Vec<(u64, String)>,
    /// New progress, when it changed.
    pub(crate) status: Option<crate::api::service::UpdateStatus>,
    /// The update failed and rolls back.
    pub(crate) rollback: bool,
}

fn live(t: &Task) -> bool {
    t.desired == DesiredState::Running && !t.state.is_terminal()
}

/// Decides one pass of a service's rolling update. `node_ready` tells
/// whether a node can still stop its tasks (a Down node's never report).
pub(crate) fn step(service: &Service, tasks: &[&Task], node_ready: &dyn Fn(NodeId) -> bool, now_ms: u64) -> UpdateStep {
    let current = service.version;
    let mut out = UpdateStep::default();
    let newest_at: std::collections::BTreeMap<Place, &Task> = tasks
        .iter()
        .filter(|t| live(t) && t.service_version == current)
        .filter_map(|t| place_of(t).map(|p| (p, *t)))
        .collect();
    // Stop-first: an old task told to stop keeps its place until it has.
    for t in tasks.iter().filter(|t| {
        t.service_version < current
            && t.desired == DesiredState::Shutdown
            && !t.state.is_terminal()
            && t.node.is_some_and(node_ready)
    }) {
        if let Some(p) = place_of(t) {
            out.resting.insert(p);
        }
    }
    // Start-first: an old task with a new one beside it is hidden, and
    // stopped once the new one runs.
    let outdated: Vec<&Task> = tasks
        .iter()
        .copied()
        .filter(|t| live(t) && t.service_version < current)
        .collect();
    for t in &outdated {
        if let Some(new) = place_of(t).and_then(|p| newest_at.get(&p)) {
            out.hidden.insert(t.id);
            if new.state == TaskState::Running {
                out.shutdown.push((t.id, "replaced by the updated task".into()));
            }
        }
    }
    let Some(mut status) = service.update_status.clone().filter(|s| s.is_active()) else {
        return out;
    };
    let config = service.spec.update;
    let rolling_back = status.state == UpdateState::RollingBack;
    // A new task that failed since the update began.
    let failed = tasks.iter().find(|t| {
        t.service_version == current
            && matches!(t.state, TaskState::Failed | TaskState::Rejected)
            && t.ended_at_ms >= status.started_at_ms
    });
    if let (Some(f), false) = (failed, config.failure_action == FailureAction::Continue) {
        if config.failure_action == FailureAction::Rollback && !rolling_back && service.previous_spec.is_some() {
            out.rollback = true;
            return out;
        }
        status.state = if rolling_back {
            UpdateState::RollbackPaused
        } else {
            UpdateState::Paused
        };
        status.message = format!(
            "{} paused: task {} failed: {}",
            if rolling_back { "rollback" } else { "update" },
            crate::api::objects::node_id_text(f.id),
            f.message
        );
        out.status = Some(status);
        return out;
    }
    let waiting_new = tasks
        .iter()
        .any(|t| live(t) && t.service_version == current && t.state < TaskState::Running);
    // An old task this update stopped whose place the scheduler has not
    // refilled yet (it does so in the same pass, after this step).
    let occupied: BTreeSet<Place> = tasks.iter().filter(|t| live(t)).filter_map(|t| place_of(t)).collect();
    let in_range = |p: &Place| match (p, service.spec.mode) {
        (Place::Slot(s), crate::api::service::ServiceMode::Replicated { replicas }) => *s <= replicas,
        _ => true,
    };
    let refilling = tasks.iter().any(|t| {
        t.service_version < current
            && t.desired == DesiredState::Shutdown
            && t.node.is_some_and(node_ready)
            && (!t.state.is_terminal() || t.ended_at_ms >= status.started_at_ms)
            && place_of(t).is_some_and(|p| in_range(&p) && !occupied.contains(&p))
    });
    let in_flight = waiting_new || refilling || !out.resting.is_empty() || !out.shutdown.is_empty();
    let mut todo: Vec<&Task> = outdated.into_iter().filter(|t| !out.hidden.contains(&t.id)).collect();
    if todo.is_empty() && !in_flight && out.hidden.is_empty() {
        status.state = if rolling_back {
            UpdateState::RolledBack
        } else {
            UpdateState::Completed
        };
        status.message = format!("{} completed", if rolling_back { "rollback" } else { "update" });
        out.status = Some(status);
        return out;
    }
    if in_flight || todo.is_empty() {
        return out;
    }
    // Between batches: note when the last one finished, then wait the delay.
    if status.batches > 0 && config.delay_ms > 0 {
        if status.batch_done_at_ms == 0 {
            status.batch_done_at_ms = now_ms;
            out.status = Some(status);
            return out;
        }
        if now_ms < status.batch_done_at_ms + config.delay_ms {
            return out;
        }
    }
    todo.sort_by_key(|t| (place_of(t), t.id));
    let size = if config.parallelism == 0 {
        todo.len()
    } else {
        config.parallelism as usize
    };
    for t in todo.into_iter().take(size) {
        match config.order {
            UpdateOrder::StopFirst => {
                out.shutdown.push((t.id, "updating".into()));
                if let Some(p) = place_of(t) {
                    out.resting.insert(p);
                }
            }
            UpdateOrder::StartFirst => {
                out.hidden.insert(t.id);
            }
        }
    }
    status.batches += 1;
    status.batch_done_at_ms = 0;
    out.status = Some(status);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::service::{UpdateConfig, UpdateStatus},
        manager::orchestrator::tests_support::{self, service},
    };

    fn task(id: u64, slot: u32, version: u64, state: TaskState) -> Task {
        Task {
            service_version: version,
            ..tests_support::task(id, 1, slot, Some(1), state)
        }
    }

    fn updating(config: UpdateConfig) -> Service {
        let mut s = service(1);
        s.version = 2;
        s.spec.update = config;
        s.previous_spec = Some(s.spec.clone());
        s.update_status = Some(UpdateStatus::start(UpdateState::Updating, 1000));
        s
    }

    fn ready(_: NodeId) -> bool {
        true
    }

    #[test]
    fn stop_first_replaces_one_batch_at_a_time_with_a_delay() {
        let s = updating(UpdateConfig {
            parallelism: 2,
            delay_ms: 500,
            ..UpdateConfig::default()
        });
        let old: Vec<Task> = (1..=3).map(|i| task(i, i as u32, 1, TaskState::Running)).collect();
        let refs: Vec<&Task> = old.iter().collect();
        let step1 = step(&s, &refs, &ready, 2000);
        assert_eq!(step1.shutdown.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(step1.resting, [Place::Slot(1), Place::Slot(2)].into());
        assert_eq!(step1.status.as_ref().unwrap().batches, 1);

        // Slots 1 and 2 now run new tasks; the delay starts counting.
        let mut s = s;
        s.update_status = step1.status;
        let now = [
            task(11, 1, 2, TaskState::Running),
            task(12, 2, 2, TaskState::Running),
            task(3, 3, 1, TaskState::Running),
        ];
        let refs: Vec<&Task> = now.iter().collect();
        let waiting = step(&s, &refs, &ready, 3000);
        assert!(waiting.shutdown.is_empty());
        s.update_status = waiting.status;
        assert!(step(&s, &refs, &ready, 3400).shutdown.is_empty(), "within the delay");
        let next = step(&s, &refs, &ready, 3500);
        assert_eq!(next.shutdown, vec![(3, "updating".to_string())]);

        let done = [
            task(11, 1, 2, TaskState::Running),
            task(12, 2, 2, TaskState::Running),
            task(13, 3, 2, TaskState::Running),
        ];
        let refs: Vec<&Task> = done.iter().collect();
        s.update_status = next.status;
        let finished = step(&s, &refs, &ready, 4000);
        assert_eq!(finished.status.unwrap().state, UpdateState::Completed);
    }

    #[test]
    fn a_failed_new_task_pauses_or_rolls_back() {
        let mut s = updating(UpdateConfig::default());
        let mut failed = task(11, 1, 2, TaskState::Failed);
        failed.ended_at_ms = 5000;
        failed.message = "task: unhealthy".into();
        let tasks = [failed, task(2, 2, 1, TaskState::Running)];
        let refs: Vec<&Task> = tasks.iter().collect();
        let paused = step(&s, &refs, &ready, 6000).status.unwrap();
        assert_eq!(paused.state, UpdateState::Paused);
        assert!(paused.message.contains("unhealthy"), "{}", paused.message);
        s.spec.update.failure_action = FailureAction::Rollback;
        assert!(step(&s, &refs, &ready, 6000).rollback);
        s.spec.update.failure_action = FailureAction::Continue;
        let going_on = step(&s, &refs, &ready, 6000);
        assert!(!going_on.rollback && going_on.status.is_none_or(|st| st.state == UpdateState::Updating));
    }

    #[test]
    fn start_first_hides_the_old_task_until_its_replacement_runs() {
        let s = updating(UpdateConfig {
            order: UpdateOrder::StartFirst,
            ..UpdateConfig::default()
        });
        let old = [task(1, 1, 1, TaskState::Running)];
        let refs: Vec<&Task> = old.iter().collect();
        let first = step(&s, &refs, &ready, 2000);
        assert_eq!(first.hidden, [1].into());
        assert!(first.shutdown.is_empty(), "the old task keeps serving");
        let both = [task(1, 1, 1, TaskState::Running), task(11, 1, 2, TaskState::Starting)];
        let refs: Vec<&Task> = both.iter().collect();
        assert!(step(&s, &refs, &ready, 2500).shutdown.is_empty());
        let both = [task(1, 1, 1, TaskState::Running), task(11, 1, 2, TaskState::Running)];
        let refs: Vec<&Task> = both.iter().collect();
        assert_eq!(step(&s, &refs, &ready, 3000).shutdown.len(), 1);
    }
}
