//! Applying the commands that change secrets and configs (pure).

use crate::manager::state::*;

/// Applies [`Command::CreateBlob`].
pub(super) fn apply_create_blob(
    state: &mut ClusterState,
    kind: crate::api::secret::Kind,
    blob: &crate::api::secret::Blob,
) -> Result<(), Refusal> {
    crate::api::secret::check_name(kind, &blob.name)?;
    crate::api::secret::check_data(kind, &blob.data)?;
    let blobs = blobs_mut(state, kind);
    if blobs.contains_key(&blob.id) {
        return Err(refusal!("{} ID {} is taken", kind.name(), blob.id));
    }
    if blobs.values().any(|b| b.name == blob.name) {
        return Err(refusal!(
                "a {} named {} already exists ({}s cannot be changed: create one under a new name and rotate services to it)",
                kind.name(),
                blob.name,
                kind.name()
            ));
    }
    blobs.insert(blob.id, blob.clone());
    Ok(())
}

/// Applies [`Command::RemoveBlob`].
pub(super) fn apply_remove_blob(
    state: &mut ClusterState,
    kind: crate::api::secret::Kind,
    id: u64,
) -> Result<(), Refusal> {
    let blob = state
        .blobs(kind)
        .get(&id)
        .ok_or_else(|| format!("{} {id} not found", kind.name()))?;
    state.check_blob_unused(kind, &blob.name)?;
    blobs_mut(state, kind).remove(&id);
    Ok(())
}
