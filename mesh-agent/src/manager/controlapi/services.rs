//! The cluster API: `service create|ls|inspect|update|rollback|rm|scale|ps`.

use crate::api::service::{ServiceSpec, ServiceUpdate};
use crate::manager::*;

impl Manager {
    pub(in crate::manager) async fn service_create(
        &self,
        state: &Arc<ClusterState>,
        spec: Box<ServiceSpec>,
    ) -> ApiResult<ClusterResponse> {
        spec.validate().map_err(ApiError::invalid)?;
        rules::check_service_in_cluster(state, &spec, None)?;
        let id = loop {
            let id: u64 = rand::thread_rng().gen();
            if id != 0 && !state.services.contains_key(&id) {
                break id;
            }
        };
        let now = unix_now();
        let service = Service {
            id,
            spec: *spec,
            version: 1,
            created_at: now,
            updated_at: now,
            previous_spec: None,
            update_status: None,
            vips: Vec::new(),
        };
        self.propose(Command::CreateService(Box::new(service))).await?;
        Ok(ClusterResponse::ServiceCreated { id })
    }

    pub(in crate::manager) async fn service_list(&self, state: &Arc<ClusterState>) -> ApiResult<ClusterResponse> {
        Ok(ClusterResponse::Services(
            state.services.values().map(|s| service_view(state, s)).collect(),
        ))
    }

    pub(in crate::manager) async fn service_inspect(
        &self,
        state: &Arc<ClusterState>,
        service: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        Ok(ClusterResponse::Services(vec![service_view(
            state,
            &state.services[&id],
        )]))
    }

    pub(in crate::manager) async fn service_update(
        &self,
        state: &Arc<ClusterState>,
        service: String,
        update: Box<ServiceUpdate>,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        let current = &state.services[&id];
        let spec = crate::api::service::apply_update(&current.spec, &update).map_err(ApiError::invalid)?;
        rules::check_service_in_cluster(state, &spec, Some(id))?;
        self.propose(Command::UpdateService {
            id,
            spec: Box::new(spec),
            force: update.force,
            at: unix_now(),
        })
        .await?;
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn service_rollback(
        &self,
        state: &Arc<ClusterState>,
        service: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        if state.services[&id].previous_spec.is_none() {
            return Err(ApiError::precondition(format!(
                "service {service} has no previous spec: it was never updated"
            )));
        }
        self.propose(Command::RollbackService {
            id,
            at_ms: unix_now_ms(),
        })
        .await?;
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn service_remove(
        &self,
        state: &Arc<ClusterState>,
        service: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        self.propose(Command::RemoveService { id, at: unix_now() }).await?;
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn service_scale(
        &self,
        state: &Arc<ClusterState>,
        service: String,
        replicas: u32,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        let mut spec = state.services[&id].spec.clone();
        match &mut spec.mode {
            ServiceMode::Replicated { replicas: r } => *r = replicas,
            ServiceMode::Global => {
                return Err(ApiError::precondition(format!(
                    "service {} is global: it runs one task per node and cannot be scaled",
                    spec.name
                )))
            }
        }
        spec.validate().map_err(ApiError::invalid)?;
        self.propose(Command::UpdateService {
            id,
            spec: Box::new(spec),
            force: false,
            at: unix_now(),
        })
        .await?;
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn task_list(
        &self,
        state: &Arc<ClusterState>,
        service: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_service(state, &service)?;
        let name = state.services[&id].spec.name.clone();
        let tasks = state
            .tasks
            .values()
            .filter(|t| t.service == id)
            .map(|t| TaskView {
                task: t.clone(),
                service_name: name.clone(),
                node_hostname: t.node.and_then(|n| state.nodes.get(&n)).map(|n| n.hostname.clone()),
            })
            .collect();
        Ok(ClusterResponse::Tasks(tasks))
    }
}
