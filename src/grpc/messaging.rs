//! `messaging.v1.MessagingService`: thin adapters from requests to the messaging domain.

use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

use super::{caller, pb};
use crate::error::Error;

/// The MessagingService endpoint.
#[derive(Clone, Default)]
pub struct MessagingApi {}

type ApiResult<T> = Result<Response<T>, Status>;

fn not_yet<T>(method: &str) -> ApiResult<T> {
    Err(Error::unimplemented(method).into())
}

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for MessagingApi {
    type SubscribeMessagesStream =
        BoxStream<'static, Result<pb::SubscribeMessagesResponse, Status>>;

    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> ApiResult<pb::CreateConversationResponse> {
        caller(&request)?;
        not_yet("CreateConversation")
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> ApiResult<pb::GetConversationResponse> {
        caller(&request)?;
        not_yet("GetConversation")
    }

    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> ApiResult<pb::ListConversationsResponse> {
        caller(&request)?;
        not_yet("ListConversations")
    }

    async fn add_participants(
        &self,
        request: Request<pb::AddParticipantsRequest>,
    ) -> ApiResult<pb::AddParticipantsResponse> {
        caller(&request)?;
        not_yet("AddParticipants")
    }

    async fn remove_participant(
        &self,
        request: Request<pb::RemoveParticipantRequest>,
    ) -> ApiResult<pb::RemoveParticipantResponse> {
        caller(&request)?;
        not_yet("RemoveParticipant")
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> ApiResult<pb::SendMessageResponse> {
        caller(&request)?;
        not_yet("SendMessage")
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> ApiResult<pb::ListMessagesResponse> {
        caller(&request)?;
        not_yet("ListMessages")
    }

    async fn subscribe_messages(
        &self,
        request: Request<pb::SubscribeMessagesRequest>,
    ) -> ApiResult<Self::SubscribeMessagesStream> {
        caller(&request)?;
        not_yet("SubscribeMessages")
    }

    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> ApiResult<pb::DeleteMessageResponse> {
        caller(&request)?;
        not_yet("DeleteMessage")
    }

    async fn mark_read(
        &self,
        request: Request<pb::MarkReadRequest>,
    ) -> ApiResult<pb::MarkReadResponse> {
        caller(&request)?;
        not_yet("MarkRead")
    }
}
