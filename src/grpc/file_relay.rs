//! `messaging.v1.FileRelayService`: thin adapters from requests to the file relay domain.

use std::sync::Arc;

use futures::stream::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::{caller, pb};
use crate::{
    error::Error,
    files::policy::{FileCategory, UploadPolicy},
};

/// The FileRelayService endpoint.
#[derive(Clone)]
pub struct FileRelayApi {
    policy: Arc<UploadPolicy>,
}

impl FileRelayApi {
    pub fn new(policy: Arc<UploadPolicy>) -> Self {
        Self { policy }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

fn not_yet<T>(method: &str) -> ApiResult<T> {
    Err(Error::unimplemented(method).into())
}

#[tonic::async_trait]
impl pb::file_relay_service_server::FileRelayService for FileRelayApi {
    type DownloadFileStream = BoxStream<'static, Result<pb::DownloadFileResponse, Status>>;

    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadFileRequest>>,
    ) -> ApiResult<pb::UploadFileResponse> {
        caller(&request)?;
        not_yet("UploadFile")
    }

    async fn get_file(
        &self,
        request: Request<pb::GetFileRequest>,
    ) -> ApiResult<pb::GetFileResponse> {
        caller(&request)?;
        not_yet("GetFile")
    }

    async fn get_download_url(
        &self,
        request: Request<pb::GetDownloadUrlRequest>,
    ) -> ApiResult<pb::GetDownloadUrlResponse> {
        caller(&request)?;
        not_yet("GetDownloadUrl")
    }

    async fn download_file(
        &self,
        request: Request<pb::DownloadFileRequest>,
    ) -> ApiResult<Self::DownloadFileStream> {
        caller(&request)?;
        not_yet("DownloadFile")
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> ApiResult<pb::DeleteFileResponse> {
        caller(&request)?;
        not_yet("DeleteFile")
    }

    async fn get_upload_policy(
        &self,
        request: Request<pb::GetUploadPolicyRequest>,
    ) -> ApiResult<pb::GetUploadPolicyResponse> {
        caller(&request)?;
        Ok(Response::new(upload_policy_to_proto(&self.policy)))
    }
}

fn upload_policy_to_proto(policy: &UploadPolicy) -> pb::GetUploadPolicyResponse {
    pb::GetUploadPolicyResponse {
        file_types: policy
            .file_types
            .iter()
            .map(|rule| pb::FileTypePolicy {
                mime_type: rule.kind.mime_type().to_owned(),
                extensions: rule
                    .kind
                    .extensions()
                    .iter()
                    .map(|ext| (*ext).to_owned())
                    .collect(),
                category: file_category_to_proto(rule.kind.category()).into(),
                max_size_bytes: i64::try_from(rule.max_size_bytes).unwrap_or(i64::MAX),
            })
            .collect(),
        retention: prost_types::Duration::try_from(policy.retention).ok(),
        max_chunk_bytes: i64::try_from(policy.max_chunk_bytes).unwrap_or(i64::MAX),
    }
}

pub(crate) fn file_category_to_proto(category: FileCategory) -> pb::FileCategory {
    match category {
        FileCategory::Document => pb::FileCategory::Document,
        FileCategory::Image => pb::FileCategory::Image,
    }
}
