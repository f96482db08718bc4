//! Results on stdout (text for people, or one JSON document per result), errors on stderr.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use indicatif::HumanBytes;
use serde_json::{Value, json};
use svcmsg_client::{DownloadOutcome, Error, UploadOutcome, code_name, pb};

pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Output { json }
    }

    fn emit(&self, value: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }

    /// A status line for a person, on stderr (stdout stays machine-readable).
    pub fn ready(&self, line: &str) {
        eprintln!("svcmsg: {line}");
    }

    pub fn error(&self, error: &Error) {
        if self.json {
            let mut object = json!({ "message": error.to_string() });
            if let Some(status) = error.status() {
                object["code"] = json!(code_name(status.code));
                object["reason"] = json!(status.reason);
                object["metadata"] = json!(status.metadata);
                if let Some(delay) = status.retry_delay {
                    object["retry_delay_seconds"] = json!(delay.as_secs_f64());
                }
            }
            eprintln!("{}", json!({ "error": object }));
        } else {
            eprintln!("svcmsg: {error}");
        }
    }

    pub fn conversations(&self, conversations: &[pb::Conversation]) {
        if self.json {
            let list: Vec<Value> = conversations.iter().map(conversation_json).collect();
            println!("{}", json!({ "conversations": list }));
            return;
        }
        for conversation in conversations {
            println!("{}", conversation_line(conversation));
        }
    }

    pub fn conversation(&self, conversation: &pb::Conversation) {
        self.emit(conversation_json(conversation), || {
            conversation_line(conversation)
        });
    }

    pub fn message(&self, message: &pb::Message) {
        self.emit(message_json(message), || message_line(message));
    }

    pub fn event(&self, event: &pb::ConversationEvent) {
        self.emit(event_json(event), || event_line(event));
    }

    pub fn uploaded(&self, outcome: &UploadOutcome) {
        let mut value = json!({
            "request_id": outcome.request_id,
            "file": file_json(&outcome.file),
            "resumptions": outcome.resumptions,
        });
        if let Some(message) = &outcome.message {
            value["message"] = message_json(message);
        }
        self.emit(value, || {
            format!(
                "uploaded {} as file {} ({} bytes, sha256 {})",
                outcome.file.file_name,
                outcome.file.file_id,
                outcome.file.size_bytes,
                outcome.file.sha256
            )
        });
    }

    pub fn downloaded(&self, outcome: &DownloadOutcome, path: &Path) {
        let value = json!({
            "path": path.display().to_string(),
            "file": file_json(&outcome.file),
            "resumptions": outcome.resumptions,
        });
        self.emit(value, || {
            format!(
                "downloaded file {} to {} ({} bytes, sha256 {})",
                outcome.file.file_id,
                path.display(),
                outcome.file.size_bytes,
                outcome.file.sha256
            )
        });
    }

    pub fn policy(&self, policy: &pb::GetUploadPolicyResponse) {
        let value = json!({
            "file_types": policy.file_types.iter().map(|kind| json!({
                "mime_type": kind.mime_type,
                "extensions": kind.extensions,
                "category": category_name(kind.category),
                "max_size_bytes": kind.max_size_bytes,
            })).collect::<Vec<_>>(),
            "retention_seconds": policy.retention.as_ref().map(|d| d.seconds),
            "max_chunk_bytes": policy.max_chunk_bytes,
            "resume_part_bytes": policy.resume_part_bytes,
            "upload_session_ttl_seconds": policy.upload_session_ttl.as_ref().map(|d| d.seconds),
        });
        self.emit(value, || {
            let mut text = String::new();
            for kind in &policy.file_types {
                text.push_str(&format!(
                    "{:<10} up to {:>10}  {}  (.{})\n",
                    category_name(kind.category),
                    HumanBytes(kind.max_size_bytes.max(0) as u64).to_string(),
                    kind.mime_type,
                    kind.extensions.join(" .")
                ));
            }
            let seconds = |d: &Option<prost_types::Duration>| {
                humantime::format_duration(Duration::from_secs(
                    d.as_ref().map_or(0, |d| d.seconds.max(0) as u64),
                ))
                .to_string()
            };
            let bytes = |n: i64| HumanBytes(n.max(0) as u64).to_string();
            text.push_str(&format!(
                "files kept {}; chunks up to {}; resumable uploads durable in parts of {}, \
                 resumable for {}",
                seconds(&policy.retention),
                bytes(policy.max_chunk_bytes),
                bytes(policy.resume_part_bytes),
                seconds(&policy.upload_session_ttl)
            ));
            text
        });
    }
}

fn timestamp(time: &Option<prost_types::Timestamp>) -> Value {
    match time {
        Some(time) => {
            let at = SystemTime::UNIX_EPOCH
                + Duration::new(time.seconds.max(0) as u64, time.nanos.max(0) as u32);
            json!(humantime::format_rfc3339_millis(at).to_string())
        }
        None => Value::Null,
    }
}

fn conversation_json(conversation: &pb::Conversation) -> Value {
    json!({
        "conversation_id": conversation.conversation_id,
        "title": conversation.title,
        "participant_ids": conversation.participant_ids,
        "created_by": conversation.created_by,
        "create_time": timestamp(&conversation.create_time),
        "last_sequence": conversation.last_sequence,
        "unread_count": conversation.unread_count,
        "last_message": conversation.last_message.as_ref().map(message_json),
    })
}

fn conversation_line(conversation: &pb::Conversation) -> String {
    format!(
        "{}  {:?}  participants: {}  last #{}  unread {}",
        conversation.conversation_id,
        conversation.title,
        conversation.participant_ids.join(","),
        conversation.last_sequence,
        conversation.unread_count
    )
}

fn message_type_name(value: i32) -> &'static str {
    match pb::MessageType::try_from(value) {
        Ok(pb::MessageType::Text) => "TEXT",
        Ok(pb::MessageType::File) => "FILE",
        Ok(pb::MessageType::Image) => "IMAGE",
        _ => "UNSPECIFIED",
    }
}

fn category_name(value: i32) -> &'static str {
    match pb::FileCategory::try_from(value) {
        Ok(pb::FileCategory::Document) => "DOCUMENT",
        Ok(pb::FileCategory::Image) => "IMAGE",
        _ => "UNSPECIFIED",
    }
}

fn message_json(message: &pb::Message) -> Value {
    json!({
        "message_id": message.message_id,
        "conversation_id": message.conversation_id,
        "sender_id": message.sender_id,
        "sequence": message.sequence,
        "type": message_type_name(message.r#type),
        "text": message.text,
        "file": message.file.as_ref().map(file_json),
        "client_message_id": message.client_message_id,
        "create_time": timestamp(&message.create_time),
        "deleted": message.deleted,
    })
}

fn message_line(message: &pb::Message) -> String {
    let body = match (&message.file, message.deleted) {
        (_, true) => "(deleted)".to_owned(),
        (Some(file), false) => format!(
            "[file {} {} {} bytes] {}",
            file.file_id, file.file_name, file.size_bytes, message.text
        ),
        (None, false) => message.text.clone(),
    };
    format!(
        "#{} {} {}: {}",
        message.sequence, message.message_id, message.sender_id, body
    )
}

fn file_json(file: &pb::FileInfo) -> Value {
    json!({
        "file_id": file.file_id,
        "conversation_id": file.conversation_id,
        "uploader_id": file.uploader_id,
        "file_name": file.file_name,
        "content_type": file.content_type,
        "size_bytes": file.size_bytes,
        "sha256": file.sha256,
        "category": category_name(file.category),
        "width": file.width,
        "height": file.height,
        "has_thumbnail": file.has_thumbnail,
        "create_time": timestamp(&file.create_time),
        "expire_time": timestamp(&file.expire_time),
    })
}

fn event_json(event: &pb::ConversationEvent) -> Value {
    use pb::conversation_event::Event;
    let mut value = json!({
        "conversation_id": event.conversation_id,
        "sequence": event.sequence,
        "create_time": timestamp(&event.create_time),
    });
    match &event.event {
        Some(Event::MessageCreated(created)) => {
            value["message_created"] = json!({
                "message": created.message.as_ref().map(message_json),
            });
        }
        Some(Event::MessageDeleted(deleted)) => {
            value["message_deleted"] = json!({
                "message_id": deleted.message_id,
                "deleted_by": deleted.deleted_by,
            });
        }
        Some(Event::ParticipantsChanged(changed)) => {
            value["participants_changed"] = json!({
                "added_user_ids": changed.added_user_ids,
                "removed_user_ids": changed.removed_user_ids,
                "changed_by": changed.changed_by,
                "participant_ids": changed.participant_ids,
            });
        }
        Some(Event::ReadReceipt(receipt)) => {
            value["read_receipt"] = json!({
                "user_id": receipt.user_id,
                "read_sequence": receipt.read_sequence,
            });
        }
        None => {}
    }
    value
}

fn event_line(event: &pb::ConversationEvent) -> String {
    use pb::conversation_event::Event;
    match &event.event {
        Some(Event::MessageCreated(created)) => match &created.message {
            Some(message) => message_line(message),
            None => format!("#{} message", event.sequence),
        },
        Some(Event::MessageDeleted(deleted)) => format!(
            "#{} {} deleted message {}",
            event.sequence, deleted.deleted_by, deleted.message_id
        ),
        Some(Event::ParticipantsChanged(changed)) => format!(
            "#{} {} changed participants: +[{}] -[{}]",
            event.sequence,
            changed.changed_by,
            changed.added_user_ids.join(","),
            changed.removed_user_ids.join(",")
        ),
        Some(Event::ReadReceipt(receipt)) => format!(
            "#{} {} read up to #{}",
            event.sequence, receipt.user_id, receipt.read_sequence
        ),
        None => format!("#{} (unknown event)", event.sequence),
    }
}
