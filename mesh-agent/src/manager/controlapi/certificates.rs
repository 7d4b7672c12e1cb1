//! The cluster API: `swarm ca` and `swarm operator-cert`: the roots, their rotation, and the
//! operator certificates the store honours.

use crate::manager::*;

impl Manager {
    pub(in crate::manager) async fn issue_operator_cert(
        &self,
        state: &Arc<ClusterState>,
        name: String,
        csr_pem: String,
        validity_secs: u64,
    ) -> ApiResult<ClusterResponse> {
        if !pki::valid_operator_name(&name) {
            return Err(ApiError::invalid(format!(
                "invalid operator name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if !(60..=366 * 86400).contains(&validity_secs) {
            return Err(ApiError::invalid("--expiry must be between 1m and 366d"));
        }
        let unix = unix_now();
        if let Some(live) = state.operators.get(&name).filter(|o| o.not_after >= unix) {
            return Err(ApiError::precondition(format!(
                    "an operator certificate named {name:?} is already issued (valid until unix time {}): revoke it first (`meshctl swarm operator-cert rm {name}`) or choose another name",
                    live.not_after
                )));
        }
        let cluster_id = cluster_id(state)?;
        let now = SystemTime::now();
        let ca = current_ca(state)?;
        let cert_pem = ca
            .issue_operator(
                &csr_pem,
                &name,
                &cluster_id,
                now - pki::backdate(Duration::from_secs(validity_secs)),
                now + Duration::from_secs(validity_secs),
            )
            .map_err(|e| ApiError::invalid(format!("cannot issue the certificate: {e}")))?;
        // Honoured only once recorded: the record is what revokes.
        let issued = ca
            .record(&cert_pem, unix)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.propose(Command::RecordOperatorCert {
            name: name.clone(),
            issued,
        })
        .await?;
        log::info!("issued an operator certificate for {name:?}, valid {validity_secs} s");
        Ok(ClusterResponse::Certificate {
            cert_pem,
            ca_pems: roots(state),
        })
    }

    pub(in crate::manager) async fn ca_inspect(&self, state: &Arc<ClusterState>) -> ApiResult<ClusterResponse> {
        Ok(ClusterResponse::Ca(Box::new(rules::ca_view(state, unix_now()))))
    }

    pub(in crate::manager) async fn operator_cert_list(&self, state: &Arc<ClusterState>) -> ApiResult<ClusterResponse> {
        Ok(ClusterResponse::OperatorCerts(
            state
                .operators
                .iter()
                .map(|(name, issued)| OperatorCertView {
                    name: name.clone(),
                    issued: issued.clone(),
                })
                .collect(),
        ))
    }

    pub(in crate::manager) async fn operator_cert_remove(
        &self,
        state: &Arc<ClusterState>,
        name: String,
    ) -> ApiResult<ClusterResponse> {
        if !state.operators.contains_key(&name) {
            return Err(ApiError::not_found(format!(
                "no operator certificate named {name:?} (`meshctl swarm operator-cert ls` lists them)"
            )));
        }
        self.propose(Command::RevokeOperatorCert { name: name.clone() }).await?;
        log::info!("revoked the operator certificate of {name:?}");
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn ca_rotate(
        &self,
        state: &Arc<ClusterState>,
        previous_root_ttl_secs: u64,
    ) -> ApiResult<ClusterResponse> {
        rules::check_previous_root_ttl(previous_root_ttl_secs)?;
        let cluster_id = cluster_id(state)?;
        let old = state
            .ca
            .clone()
            .ok_or_else(|| ApiError::internal("the store has no CA"))?;
        let new = RootCa::generate(&cluster_id).map_err(|e| ApiError::internal(e.to_string()))?;
        let cross_signed_pem = current_ca(state)?
            .cross_sign(&new, &cluster_id)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let digest = new.digest();
        let ca = CaState {
            root_cert_pem: new.cert_pem().to_string(),
            root_key_pem: SecretText::new(new.key_pem()),
            // Keep trusting the old root until every node and
            // operator has renewed, or its deadline.
            previous_roots_pem: vec![old.root_cert_pem],
            previous_until: unix_now() + previous_root_ttl_secs,
            cross_signed_pem,
        };
        let tokens = JoinTokens {
            worker: JoinToken::generate(digest).to_text(),
            manager: JoinToken::generate(digest).to_text(),
        };
        self.propose(Command::RotateCa { ca, tokens }).await?;
        Ok(ClusterResponse::CaDigest(hex::encode(digest)))
    }
}
