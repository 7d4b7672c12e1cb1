//! Applying the commands that change services: create, update, rollback, remove (pure).

use crate::api::service::HistoryPlace;
use crate::manager::state::*;

/// Applies [`Command::CreateService`].
pub(super) fn apply_create_service(state: &mut ClusterState, service: &Service) -> Result<(), Refusal> {
    if state.services.contains_key(&service.id) {
        return Err(refusal!("service ID {} is taken", service.id));
    }
    if state.services.values().any(|s| s.spec.name == service.spec.name) {
        return Err(refusal!("a service named {:?} already exists", service.spec.name));
    }
    let mut service = service.clone();
    service.vips = virtual_ips(state, &service)?;
    state.services.insert(service.id, service);
    Ok(())
}

/// Applies [`Command::UpdateService`].
pub(super) fn apply_update_service(
    state: &mut ClusterState,
    id: u64,
    spec: &ServiceSpec,
    force: bool,
    at: u64,
) -> Result<(), Refusal> {
    let service = state
        .services
        .get_mut(&id)
        .ok_or_else(|| format!("service {id} not found"))?;
    // Only a new task template (or --force) rolls the tasks.
    if force || service.spec.task_template_differs(spec) {
        service.previous_spec = Some(service.spec.clone());
        service.version += 1;
        service.update_status = Some(UpdateStatus::start(UpdateState::Updating, at * 1000));
    }
    service.spec = spec.clone();
    service.updated_at = at;
    let service = service.clone();
    let vips = virtual_ips(state, &service)?;
    if let Some(s) = state.services.get_mut(&id) {
        s.vips = vips;
    }
    Ok(())
}

/// Applies [`Command::RollbackService`].
pub(super) fn apply_rollback_service(state: &mut ClusterState, id: u64, at_ms: u64) -> Result<(), Refusal> {
    roll_back(state, id, at_ms)?;
    Ok(())
}

/// Applies [`Command::RemoveService`].
pub(super) fn apply_remove_service(state: &mut ClusterState, id: u64, at: u64) -> Result<(), Refusal> {
    state
        .services
        .remove(&id)
        .ok_or_else(|| format!("service {id} not found"))?;
    let stopping: Vec<u64> = state
        .tasks
        .values()
        .filter(|t| t.service == id && t.desired == DesiredState::Running)
        .map(|t| t.id)
        .collect();
    for id in stopping {
        if let Some(task) = state.tasks.get_mut(&id) {
            task.desired = DesiredState::Shutdown;
            task.updated_at = at;
        }
    }
    // Its history goes with it; tasks still stopping follow as they end.
    let history: BTreeSet<HistoryPlace> = state
        .tasks
        .values()
        .filter(|t| t.service == id && t.is_finished())
        .map(Task::history_place)
        .collect();
    prune_task_history(state, Some(&history));
    Ok(())
}
