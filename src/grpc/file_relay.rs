//! `messaging.v1.FileRelayService`: thin adapters from requests to the file relay domain.

use std::sync::Arc;

use futures::{StreamExt, stream::BoxStream};
use tonic::{Request, Response, Status, Streaming};

use super::{caller, convert, pb};
use crate::{files::service::FileService, ids::FileId};

/// The FileRelayService endpoint.
#[derive(Clone)]
pub struct FileRelayApi {
    files: Arc<FileService>,
}

impl FileRelayApi {
    pub fn new(files: Arc<FileService>) -> Self {
        Self { files }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::file_relay_service_server::FileRelayService for FileRelayApi {
    type DownloadFileStream = BoxStream<'static, Result<pb::DownloadFileResponse, Status>>;

    #[tracing::instrument(skip_all)]
    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadFileRequest>>,
    ) -> ApiResult<pb::UploadFileResponse> {
        let caller = caller(&request)?;
        let parts = request.into_inner().map(convert::upload_part);
        let (record, message) = self.files.upload(&caller, Box::pin(parts)).await?;
        Ok(Response::new(pb::UploadFileResponse {
            file: Some(convert::file_record(&record)),
            message: Some(convert::message(message)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_file(
        &self,
        request: Request<pb::GetFileRequest>,
    ) -> ApiResult<pb::GetFileResponse> {
        let caller = caller(&request)?;
        let file_id = FileId::from_field("file_id", &request.get_ref().file_id)?;
        let record = self.files.get_file(&caller, &file_id).await?;
        Ok(Response::new(pb::GetFileResponse {
            file: Some(convert::file_record(&record)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_download_url(
        &self,
        request: Request<pb::GetDownloadUrlRequest>,
    ) -> ApiResult<pb::GetDownloadUrlResponse> {
        let caller = caller(&request)?;
        let file_id = FileId::from_field("file_id", &request.get_ref().file_id)?;
        let urls = self.files.download_urls(&caller, &file_id).await?;
        Ok(Response::new(pb::GetDownloadUrlResponse {
            url: urls.url,
            thumbnail_url: urls.thumbnail_url.unwrap_or_default(),
            expire_time: Some(convert::timestamp(urls.expire_time)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn download_file(
        &self,
        request: Request<pb::DownloadFileRequest>,
    ) -> ApiResult<Self::DownloadFileStream> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let file_id = FileId::from_field("file_id", &request.file_id)?;
        let chunks = self
            .files
            .download(&caller, &file_id, request.offset)
            .await?;
        let responses = chunks.map(|chunk| {
            chunk
                .map(|chunk| pb::DownloadFileResponse { chunk })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(responses)))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> ApiResult<pb::DeleteFileResponse> {
        let caller = caller(&request)?;
        let file_id = FileId::from_field("file_id", &request.get_ref().file_id)?;
        self.files.delete(&caller, &file_id).await?;
        Ok(Response::new(pb::DeleteFileResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_upload_status(
        &self,
        request: Request<pb::GetUploadStatusRequest>,
    ) -> ApiResult<pb::GetUploadStatusResponse> {
        let caller = caller(&request)?;
        let status = self
            .files
            .upload_status(&caller, &request.get_ref().request_id)
            .await?;
        Ok(Response::new(convert::upload_status(&status)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_upload_policy(
        &self,
        request: Request<pb::GetUploadPolicyRequest>,
    ) -> ApiResult<pb::GetUploadPolicyResponse> {
        caller(&request)?;
        Ok(Response::new(convert::upload_policy(self.files.policy())))
    }
}
