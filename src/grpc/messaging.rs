//! `messaging.v1.MessagingService`: request -> domain call -> response, nothing more.

use std::sync::Arc;

use futures::{StreamExt, stream::BoxStream};
use tonic::{Request, Response, Status};

use super::{caller, convert, pb};
use crate::{
    ids::{MessageId, UserId},
    messaging::{
        model::ClientId,
        paging::PageSize,
        service::{ConversationService, parse_users},
    },
};

/// The MessagingService endpoint.
#[derive(Clone)]
pub struct MessagingApi {
    conversations: Arc<ConversationService>,
}

impl MessagingApi {
    pub fn new(conversations: Arc<ConversationService>) -> Self {
        Self { conversations }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::messaging_service_server::MessagingService for MessagingApi {
    type SubscribeMessagesStream =
        BoxStream<'static, Result<pb::SubscribeMessagesResponse, Status>>;

    #[tracing::instrument(skip_all)]
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> ApiResult<pb::CreateConversationResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let participants = parse_users("participant_ids", &request.participant_ids, 0)?;
        let request_id = convert::optional(&request.request_id, |raw| {
            ClientId::from_field("request_id", raw)
        })?;
        let view = self
            .conversations
            .create_conversation(&caller, &request.title, participants, request_id)
            .await?;
        Ok(Response::new(pb::CreateConversationResponse {
            conversation: Some(convert::conversation(view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> ApiResult<pb::GetConversationResponse> {
        let caller = caller(&request)?;
        let id = convert::conversation_id(&request.get_ref().conversation_id)?;
        let view = self.conversations.get_conversation(&caller, id).await?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(convert::conversation(view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> ApiResult<pb::ListConversationsResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let size = PageSize::parse(request.page_size)?;
        let (views, next_page_token) = self
            .conversations
            .list_conversations(&caller, size, &request.page_token)
            .await?;
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: views.into_iter().map(convert::conversation).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn add_participants(
        &self,
        request: Request<pb::AddParticipantsRequest>,
    ) -> ApiResult<pb::AddParticipantsResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let users = parse_users("user_ids", &request.user_ids, 1)?;
        let view = self
            .conversations
            .add_participants(&caller, id, &users)
            .await?;
        Ok(Response::new(pb::AddParticipantsResponse {
            conversation: Some(convert::conversation(view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_participant(
        &self,
        request: Request<pb::RemoveParticipantRequest>,
    ) -> ApiResult<pb::RemoveParticipantResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let user = UserId::from_field("user_id", &request.user_id)?;
        let view = self
            .conversations
            .remove_participant(&caller, id, &user)
            .await?;
        Ok(Response::new(pb::RemoveParticipantResponse {
            conversation: Some(convert::conversation(view)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> ApiResult<pb::SendMessageResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let client_message_id =
            ClientId::from_field("client_message_id", &request.client_message_id)?;
        let content = request.content.map(convert::send_content).transpose()?;
        let message = self
            .conversations
            .send_message(&caller, id, client_message_id, content)
            .await?;
        Ok(Response::new(pb::SendMessageResponse {
            message: Some(convert::message(message)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> ApiResult<pb::ListMessagesResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let size = PageSize::parse(request.page_size)?;
        let (messages, next_page_token) = self
            .conversations
            .list_messages(&caller, id, size, &request.page_token)
            .await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages: messages.into_iter().map(convert::message).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn subscribe_messages(
        &self,
        request: Request<pb::SubscribeMessagesRequest>,
    ) -> ApiResult<Self::SubscribeMessagesStream> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let events = self
            .conversations
            .subscribe(&caller, id, request.after_sequence)
            .await?;
        let responses = events.map(|event| {
            event
                .map(|event| pb::SubscribeMessagesResponse {
                    event: Some(convert::event(event)),
                })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(responses)))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> ApiResult<pb::DeleteMessageResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let message_id = MessageId::from_field("message_id", &request.message_id)?;
        let message = self
            .conversations
            .delete_message(&caller, id, message_id)
            .await?;
        Ok(Response::new(pb::DeleteMessageResponse {
            message: Some(convert::message(message)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn mark_read(
        &self,
        request: Request<pb::MarkReadRequest>,
    ) -> ApiResult<pb::MarkReadResponse> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let id = convert::conversation_id(&request.conversation_id)?;
        let read_sequence = self
            .conversations
            .mark_read(&caller, id, request.sequence)
            .await?;
        Ok(Response::new(pb::MarkReadResponse { read_sequence }))
    }
}
