//! The `ControlPlane` gRPC service: projects, builds (submit, get, list, cancel, watch, logs),
//! boxes (list, cordon, drain), cells, size classes, private networks, connectors, API tokens
//! and the audit log. Errors are `tonic::Status` values whose message names the problem and the
//! input (`project "x" not found`).
//!
//! Every RPC first authenticates its caller and checks the [`Right`] it needs (`auth`), before
//! it reads its input: no token is UNAUTHENTICATED, a role without the right PERMISSION_DENIED.
//! Each change is recorded in the audit log in the change's own transaction.
//!
//! One file per concern: `projects`, `secrets`, `forge`, `builds`, `boxes`, `networks`, `tokens`; this
//! one holds the service, its shared look-ups and error mapping, and the trait impl that hands
//! each RPC to its file.

mod boxes;
mod builds;
mod forge;
mod networks;
mod projects;
mod secrets;
mod tokens;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller, Right};
use crate::state::Hive;
use crate::store::{NetworkError, ProjectRow, StoreError};

pub use builds::{build_to_proto, check_ref_name, check_revision};
pub use projects::{
    project_to_proto, validate_project, DEFAULT_TIMEOUT_SECS, MAX_SECRET_LEN, MAX_TIMEOUT_SECS,
};

/// The gRPC `ControlPlane` service.
#[derive(Clone)]
pub struct ControlPlaneService {
    pub hive: Arc<Hive>,
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::ProjectExists(name) => {
            Status::already_exists(format!("project {name:?} already exists"))
        }
        other => Status::internal(other.to_string()),
    }
}

fn net_err(e: NetworkError) -> Status {
    match e {
        NetworkError::Store(e) => store_err(e),
        NetworkError::Exists(_) | NetworkError::ConnectorExists(_) => {
            Status::already_exists(e.to_string())
        }
        NetworkError::NotFound(_) => Status::not_found(e.to_string()),
        NetworkError::InUse { .. } | NetworkError::PoolExhausted { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl ControlPlaneService {
    /// The caller of `rpc`, if its token is good and its role holds `right`.
    async fn caller<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        right: Right,
    ) -> Result<Caller, Status> {
        let caller = auth::authenticate(&self.hive.store, request.metadata()).await?;
        caller.require(rpc, right)?;
        Ok(caller)
    }

    async fn project(&self, name_or_id: &str) -> Result<ProjectRow, Status> {
        if name_or_id.is_empty() {
            return Err(Status::invalid_argument("project (name or id) is required"));
        }
        self.hive
            .store
            .get_project(name_or_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("project {name_or_id:?} not found")))
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_plane_server::ControlPlane for ControlPlaneService {
    type WatchBuildStream = Stream_<pb::Build>;
    type StreamLogsStream = Stream_<pb::LogChunk>;
    type GetArtifactStream = Stream_<pb::ArtifactData>;

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        self.caller(&request, "Health", Right::Read).await?;
        let (ok, detail) = match self.hive.store.ping().await {
            Ok(()) => (true, format!("{} ok", self.hive.store.kind().name())),
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(pb::HealthReply {
            ok,
            version: env!("CARGO_PKG_VERSION").to_string(),
            detail,
        }))
    }

    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        projects::create_project(self, request).await
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsReply>, Status> {
        projects::list_projects(self, request).await
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        projects::get_project(self, request).await
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<pb::DeleteProjectReply>, Status> {
        projects::delete_project(self, request).await
    }

    async fn submit_build(
        &self,
        request: Request<pb::SubmitBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        builds::submit_build(self, request).await
    }

    async fn rebuild_build(
        &self,
        request: Request<pb::RebuildBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        builds::rebuild_build(self, request).await
    }

    async fn get_build(
        &self,
        request: Request<pb::GetBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        builds::get_build(self, request).await
    }

    async fn list_builds(
        &self,
        request: Request<pb::ListBuildsRequest>,
    ) -> Result<Response<pb::ListBuildsReply>, Status> {
        builds::list_builds(self, request).await
    }

    async fn cancel_build(
        &self,
        request: Request<pb::CancelBuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        builds::cancel_build(self, request).await
    }

    async fn watch_build(
        &self,
        request: Request<pb::WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        builds::watch_build(self, request).await
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        builds::stream_logs(self, request).await
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsReply>, Status> {
        builds::list_artifacts(self, request).await
    }

    async fn get_artifact(
        &self,
        request: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        builds::get_artifact(self, request).await
    }

    async fn list_boxes(
        &self,
        request: Request<pb::ListBoxesRequest>,
    ) -> Result<Response<pb::ListBoxesReply>, Status> {
        boxes::list_boxes(self, request).await
    }

    async fn cordon_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        boxes::box_action(self, request, boxes::BoxAction::Cordon).await
    }

    async fn drain_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        boxes::box_action(self, request, boxes::BoxAction::Drain).await
    }

    async fn uncordon_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::BoxInfo>, Status> {
        boxes::box_action(self, request, boxes::BoxAction::Uncordon).await
    }

    async fn forget_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::ForgetBoxReply>, Status> {
        boxes::forget_box(self, request).await
    }

    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        secrets::set_secret(self, request).await
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsReply>, Status> {
        secrets::list_secrets(self, request).await
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretReply>, Status> {
        secrets::delete_secret(self, request).await
    }

    async fn clone_access(
        &self,
        request: Request<pb::CloneAccessRequest>,
    ) -> Result<Response<pb::CloneAccessReply>, Status> {
        secrets::clone_access(self, request).await
    }

    async fn forge_status(
        &self,
        request: Request<pb::ForgeStatusRequest>,
    ) -> Result<Response<pb::ForgeStatusReply>, Status> {
        forge::forge_status(self, request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenReply>, Status> {
        boxes::create_join_token(self, request).await
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensReply>, Status> {
        boxes::list_join_tokens(self, request).await
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenInfo>, Status> {
        boxes::revoke_join_token(self, request).await
    }

    async fn revoke_box(
        &self,
        request: Request<pb::BoxActionRequest>,
    ) -> Result<Response<pb::RevokeBoxReply>, Status> {
        boxes::revoke_box(self, request).await
    }

    async fn list_cells(
        &self,
        request: Request<pb::ListCellsRequest>,
    ) -> Result<Response<pb::ListCellsReply>, Status> {
        boxes::list_cells(self, request).await
    }

    async fn list_size_classes(
        &self,
        request: Request<pb::ListSizeClassesRequest>,
    ) -> Result<Response<pb::ListSizeClassesReply>, Status> {
        boxes::list_size_classes(self, request).await
    }

    async fn create_network(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::PrivateNetwork>, Status> {
        networks::create_network(self, request).await
    }

    async fn list_networks(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksReply>, Status> {
        networks::list_networks(self, request).await
    }

    async fn delete_network(
        &self,
        request: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkReply>, Status> {
        networks::delete_network(self, request).await
    }

    async fn add_connector(
        &self,
        request: Request<pb::AddConnectorRequest>,
    ) -> Result<Response<pb::AddConnectorReply>, Status> {
        networks::add_connector(self, request).await
    }

    async fn list_connectors(
        &self,
        request: Request<pb::ListConnectorsRequest>,
    ) -> Result<Response<pb::ListConnectorsReply>, Status> {
        networks::list_connectors(self, request).await
    }

    async fn remove_connector(
        &self,
        request: Request<pb::RemoveConnectorRequest>,
    ) -> Result<Response<pb::RemoveConnectorReply>, Status> {
        networks::remove_connector(self, request).await
    }

    async fn list_tunnel_leases(
        &self,
        request: Request<pb::ListTunnelLeasesRequest>,
    ) -> Result<Response<pb::ListTunnelLeasesReply>, Status> {
        networks::list_tunnel_leases(self, request).await
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        tokens::create_token(self, request).await
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        tokens::list_tokens(self, request).await
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        tokens::revoke_token(self, request).await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditReply>, Status> {
        tokens::list_audit(self, request).await
    }
}
