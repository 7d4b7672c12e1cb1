//! The cluster API: `secret` and `config`: create, ls, inspect, rm (a secret's content never
//! leaves the managers this way).

use crate::manager::*;
use std::collections::BTreeMap;

impl Manager {
    pub(in crate::manager) async fn blob_create(
        &self,
        state: &Arc<ClusterState>,
        kind: secret::Kind,
        name: String,
        labels: BTreeMap<String, String>,
        data: Vec<u8>,
    ) -> ApiResult<ClusterResponse> {
        secret::check_name(kind, &name).map_err(ApiError::invalid)?;
        secret::check_data(kind, &data).map_err(ApiError::invalid)?;
        if state.blobs(kind).values().any(|b| b.name == name) {
            return Err(ApiError::precondition(format!(
                    "a {} named {name} already exists ({}s cannot be changed: create one under a new name and rotate services to it with --{}-rm/--{}-add)",
                    kind.name(),
                    kind.name(),
                    kind.name(),
                    kind.name()
                )));
        }
        let id = loop {
            let id: u64 = rand::thread_rng().gen();
            if id != 0 && !state.blobs(kind).contains_key(&id) {
                break id;
            }
        };
        let now = unix_now();
        let blob = secret::Blob {
            id,
            name,
            labels,
            data,
            created: now,
            updated: now,
        };
        self.propose(Command::CreateBlob {
            kind,
            blob: Box::new(blob),
        })
        .await?;
        Ok(ClusterResponse::BlobCreated { id })
    }

    pub(in crate::manager) async fn blob_list(
        &self,
        state: &Arc<ClusterState>,
        kind: secret::Kind,
    ) -> ApiResult<ClusterResponse> {
        Ok(ClusterResponse::Blobs(
            state.blobs(kind).values().map(|b| blob_view(state, kind, b)).collect(),
        ))
    }

    pub(in crate::manager) async fn blob_inspect(
        &self,
        state: &Arc<ClusterState>,
        kind: secret::Kind,
        name: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_blob(state, kind, &name)?;
        Ok(ClusterResponse::Blobs(vec![blob_view(
            state,
            kind,
            &state.blobs(kind)[&id],
        )]))
    }

    pub(in crate::manager) async fn blob_remove(
        &self,
        state: &Arc<ClusterState>,
        kind: secret::Kind,
        name: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_blob(state, kind, &name)?;
        state
            .check_blob_unused(kind, &state.blobs(kind)[&id].name)
            .map_err(ApiError::precondition)?;
        self.propose(Command::RemoveBlob { kind, id }).await?;
        Ok(ClusterResponse::Done)
    }
}
