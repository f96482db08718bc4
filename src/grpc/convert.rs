//! Protobuf messages to domain values and back. Prost types never travel further in than this
//! layer.

use super::pb;
use crate::{
    error::{Error, Reason},
    files::{
        policy::{FileCategory, UploadPolicy},
        resume::UploadStatus,
        service::{UploadPart, UploadRequest, UploadResume},
    },
    ids::{ConversationId, FileId},
    messaging::{
        model::{Event, EventKind, FileAttachment, Message, MessageKind, UnixMillis},
        service::{ConversationView, SendContent},
    },
    store::file_records::FileRecord,
};

pub fn timestamp(millis: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn conversation(view: ConversationView) -> pb::Conversation {
    let ConversationView {
        conversation,
        unread_count,
        last_message,
    } = view;
    pb::Conversation {
        conversation_id: conversation.id.to_string(),
        title: conversation.title,
        participant_ids: conversation
            .participants
            .iter()
            .map(|user| user.as_str().to_owned())
            .collect(),
        created_by: conversation.created_by.as_str().to_owned(),
        create_time: Some(timestamp(conversation.create_time)),
        last_sequence: conversation.last_sequence,
        unread_count,
        last_message: last_message.map(message),
    }
}

pub fn message(message: Message) -> pb::Message {
    let Message {
        conversation_id,
        sequence,
        create_time,
        record,
    } = message;
    let kind = match record.kind {
        MessageKind::Text => pb::MessageType::Text,
        MessageKind::File => pb::MessageType::File,
        MessageKind::Image => pb::MessageType::Image,
    };
    let deleted = record.is_deleted();
    let (text, file) = match record.content {
        Some(content) => (
            content.text,
            content
                .file
                .map(|file| file_info(file, &conversation_id.to_string())),
        ),
        None => (String::new(), None),
    };
    pb::Message {
        message_id: record.id.to_string(),
        conversation_id: conversation_id.to_string(),
        sender_id: record.sender.as_str().to_owned(),
        sequence,
        r#type: kind.into(),
        text,
        file,
        client_message_id: record.client_message_id.as_str().to_owned(),
        create_time: Some(timestamp(create_time)),
        deleted,
    }
}

pub fn file_info(file: FileAttachment, conversation_id: &str) -> pb::FileInfo {
    pb::FileInfo {
        file_id: file.file_id.to_string(),
        conversation_id: conversation_id.to_owned(),
        uploader_id: file.uploader.as_str().to_owned(),
        file_name: file.file_name,
        content_type: file.content_type,
        size_bytes: i64::try_from(file.size_bytes).unwrap_or(i64::MAX),
        sha256: file.sha256,
        category: file_category(file.category).into(),
        width: file.width,
        height: file.height,
        has_thumbnail: file.has_thumbnail,
        create_time: Some(timestamp(file.create_time)),
        expire_time: Some(timestamp(file.expire_time)),
    }
}

pub fn file_record(record: &FileRecord) -> pb::FileInfo {
    let conversation_id = record.conversation_id.to_string();
    file_info(record.attachment(), &conversation_id)
}

pub fn event(event: Event) -> pb::ConversationEvent {
    use pb::conversation_event::Event as Kind;
    let created = event.created_message();
    let kind = match event.kind {
        EventKind::MessageCreated(_) => Kind::MessageCreated(pb::MessageCreated {
            message: created.map(message),
        }),
        EventKind::MessageDeleted {
            message_id,
            deleted_by,
        } => Kind::MessageDeleted(pb::MessageDeleted {
            message_id: message_id.to_string(),
            deleted_by: deleted_by.as_str().to_owned(),
        }),
        EventKind::ParticipantsChanged {
            added,
            removed,
            changed_by,
            participants,
        } => Kind::ParticipantsChanged(pb::ParticipantsChanged {
            added_user_ids: added.iter().map(|u| u.as_str().to_owned()).collect(),
            removed_user_ids: removed.iter().map(|u| u.as_str().to_owned()).collect(),
            changed_by: changed_by.as_str().to_owned(),
            participant_ids: participants.iter().map(|u| u.as_str().to_owned()).collect(),
        }),
        EventKind::ReadReceipt {
            user_id,
            read_sequence,
        } => Kind::ReadReceipt(pb::ReadReceipt {
            user_id: user_id.as_str().to_owned(),
            read_sequence,
        }),
    };
    pb::ConversationEvent {
        conversation_id: event.conversation_id.to_string(),
        sequence: event.sequence,
        create_time: Some(timestamp(event.create_time)),
        event: Some(kind),
    }
}

/// One message of an upload stream as the upload pipeline takes it.
pub fn upload_part(
    message: Result<pb::UploadFileRequest, tonic::Status>,
) -> Result<UploadPart, Error> {
    use pb::upload_file_request::Payload;
    match message {
        Ok(pb::UploadFileRequest {
            payload: Some(Payload::Metadata(metadata)),
        }) => Ok(UploadPart::Metadata(UploadRequest {
            conversation_id: conversation_id(&metadata.conversation_id)?,
            file_name: metadata.file_name,
            content_type: metadata.content_type,
            size_bytes: metadata.size_bytes,
            sha256: metadata.sha256,
            caption: metadata.caption,
            request_id: metadata.request_id,
        })),
        Ok(pb::UploadFileRequest {
            payload: Some(Payload::Resume(resume)),
        }) => Ok(UploadPart::Resume(UploadResume {
            request_id: resume.request_id,
            write_offset: resume.write_offset,
        })),
        Ok(pb::UploadFileRequest {
            payload: Some(Payload::Chunk(chunk)),
        }) => Ok(UploadPart::Chunk(chunk)),
        Ok(pb::UploadFileRequest { payload: None }) => Err(Error::invalid_field(
            "payload",
            "each message must carry metadata, resume or a chunk",
        )),
        // The client's stream broke off (or sent a message over the size limit).
        Err(status) => Err(Error::invalid(
            Reason::InvalidField,
            format!("the upload stream failed: {}", status.message()),
        )),
    }
}

/// The content of a `SendMessage` request.
pub fn send_content(content: pb::send_message_request::Content) -> Result<SendContent, Error> {
    use pb::send_message_request::Content;
    Ok(match content {
        Content::Text(text) => SendContent::Text(text),
        Content::FileId(file_id) => SendContent::FileId(FileId::from_field("file_id", &file_id)?),
    })
}

/// The `conversation_id` field of a request.
pub fn conversation_id(raw: &str) -> Result<ConversationId, Error> {
    ConversationId::from_field("conversation_id", raw)
}

/// `None` for an empty (unset) field, else the field parsed.
pub fn optional<T>(
    raw: &str,
    parse: impl FnOnce(&str) -> Result<T, Error>,
) -> Result<Option<T>, Error> {
    if raw.is_empty() {
        return Ok(None);
    }
    parse(raw).map(Some)
}

pub fn upload_policy(policy: &UploadPolicy) -> pb::GetUploadPolicyResponse {
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
                category: file_category(rule.kind.category()).into(),
                max_size_bytes: i64::try_from(rule.max_size_bytes).unwrap_or(i64::MAX),
            })
            .collect(),
        retention: prost_types::Duration::try_from(policy.retention).ok(),
        max_chunk_bytes: i64::try_from(policy.max_chunk_bytes).unwrap_or(i64::MAX),
        resume_part_bytes: i64::try_from(policy.resume_part_bytes).unwrap_or(i64::MAX),
        upload_session_ttl: prost_types::Duration::try_from(policy.session_ttl).ok(),
        min_chunk_bytes: i64::try_from(policy.min_chunk_bytes).unwrap_or(i64::MAX),
        idle_timeout: prost_types::Duration::try_from(policy.idle_timeout).ok(),
        max_upload_duration: prost_types::Duration::try_from(policy.max_duration).ok(),
    }
}

pub fn upload_status(status: &UploadStatus) -> pb::GetUploadStatusResponse {
    pb::GetUploadStatusResponse {
        committed_size: i64::try_from(status.committed_size).unwrap_or(i64::MAX),
        size_bytes: i64::try_from(status.size_bytes).unwrap_or(i64::MAX),
        complete: status.complete,
        file: status.file.as_ref().map(file_record),
        expire_time: Some(timestamp(status.expire_time)),
    }
}

pub fn file_category(category: FileCategory) -> pb::FileCategory {
    match category {
        FileCategory::Document => pb::FileCategory::Document,
        FileCategory::Image => pb::FileCategory::Image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_millis() {
        let ts = timestamp(1_700_000_000_123);
        assert_eq!(ts.seconds, 1_700_000_000);
        assert_eq!(ts.nanos, 123_000_000);
    }
}
