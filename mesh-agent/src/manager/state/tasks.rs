//! Applying the commands that change tasks: the orchestrator's plans and the nodes' reports (pure).

use crate::manager::state::*;

/// Applies [`Command::ApplyPlan`].
pub(super) fn apply_plan(
    state: &mut ClusterState,
    create: &[Task],
    shutdown: &[(u64, String)],
    updates: &[(u64, UpdateStatus)],
    rollbacks: &[u64],
    orphaned: &[u64],
    at: u64,
) -> Result<(), Refusal> {
    for (id, status) in updates {
        if let Some(service) = state.services.get_mut(id) {
            service.update_status = Some(status.clone());
        }
    }
    for id in rollbacks {
        roll_back(state, *id, at * 1000)?;
    }
    if let Some(t) = create.iter().find(|t| state.tasks.contains_key(&t.id)) {
        return Err(refusal!("task ID {} is taken", t.id));
    }
    let create = settle_addresses(state, create)?;
    let mut touched = BTreeSet::new();
    for (id, reason) in shutdown {
        if let Some(task) = state.tasks.get_mut(id) {
            task.desired = DesiredState::Shutdown;
            // An ended task keeps the message saying how it ended.
            if !task.state.is_terminal() {
                task.message = reason.clone();
                task.updated_at = at;
            }
            if task.is_finished() {
                touched.insert(task.history_place());
            }
        }
    }
    for id in orphaned {
        if let Some(task) = state.tasks.get_mut(id).filter(|t| !t.state.is_terminal()) {
            task.state = TaskState::Orphaned;
            task.desired = DesiredState::Shutdown;
            task.message = "its node was lost (down for over 24h, or removed); how it ended is unknown".into();
            task.updated_at = at;
            task.ended_at_ms = at * 1000;
            touched.insert(task.history_place());
        }
    }
    touched.extend(create.iter().filter(|t| t.is_finished()).map(|t| t.history_place()));
    state.tasks.extend(create.into_iter().map(|t| (t.id, t)));
    prune_task_history(state, Some(&touched));
    Ok(())
}

/// Applies [`Command::ReportTasks`].
pub(super) fn apply_report_tasks(
    state: &mut ClusterState,
    node: NodeId,
    reports: &[TaskReport],
    at_ms: u64,
) -> Result<(), Refusal> {
    let mut touched = BTreeSet::new();
    for r in reports {
        let Some(task) = state.tasks.get_mut(&r.task) else {
            continue;
        };
        if !task.takes_report(node, r) {
            continue;
        }
        task.state = r.state;
        task.message = r.message.to_string();
        task.updated_at = at_ms / 1000;
        if r.state.is_terminal() {
            task.ended_at_ms = at_ms;
        }
        if task.is_finished() {
            touched.insert(task.history_place());
        }
    }
    prune_task_history(state, Some(&touched));
    Ok(())
}

/// Applies [`Command::SetTaskState`].
pub(super) fn apply_set_task_state(
    state: &mut ClusterState,
    id: u64,
    to: TaskState,
    message: &str,
    at: u64,
) -> Result<(), Refusal> {
    let task = state.tasks.get_mut(&id).ok_or_else(|| format!("task {id} not found"))?;
    if task.state == to {
        return Ok(());
    }
    if !task.state.may_become(to) {
        return Err(refusal!(
            "task {id} cannot go from {} to {}",
            task.state.name(),
            to.name()
        ));
    }
    task.state = to;
    task.message = message.to_string();
    task.updated_at = at;
    Ok(())
}
