//! Key names. Every key of one conversation carries the hash tag `{c:<id>}`, so each script
//! touches a single slot and the layout works on Redis Cluster; a user's conversation index
//! carries `{u:<user>}` and lives elsewhere (it is derived data, written after the scripts).

use crate::{
    ids::{ConversationId, FileId, UserId},
    store::fs_sessions::session_digest,
};

/// Names keys under one `redis.key_prefix`.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub(super) fn conversation(&self, id: ConversationId) -> ConversationKeys {
        ConversationKeys {
            base: format!("{}:{{c:{id}}}:", self.prefix),
        }
    }

    /// `P:{u:USER}:convs`: ZSET of conversation ids scored by their latest activity (ms).
    pub(super) fn user_conversations(&self, user: &UserId) -> String {
        format!("{}:{{u:{}}}:convs", self.prefix, user.as_str())
    }

    /// `P:{u:USER}:req:<digest>`: the conversation a creator's `request_id` created, expiring
    /// with the idempotency window. The digest covers the user and the request id
    /// (length-prefixed), so no two pairs share a key whatever characters user ids contain.
    pub(super) fn create_request(&self, user: &UserId, request_id: &str) -> String {
        let digest = session_digest(user, request_id);
        format!("{}:{{u:{}}}:req:{digest}", self.prefix, user.as_str())
    }

    /// `P:{u:USER}:upload:<digest>`: one upload session (HASH, see `upload_prelude.lua`),
    /// named by the same length-prefixed digest of the owner and the `request_id`.
    pub(super) fn upload_session(&self, user: &UserId, request_id: &str) -> String {
        let digest = session_digest(user, request_id);
        format!("{}:{{u:{}}}:upload:{digest}", self.prefix, user.as_str())
    }

    /// `P:{u:USER}:uploads`: ZSET of the user's unfinished upload sessions (digests) scored by
    /// their `expire_time`, in the sessions' slot (for `max_open`).
    pub(super) fn user_uploads(&self, user: &UserId) -> String {
        format!("{}:{{u:{}}}:uploads", self.prefix, user.as_str())
    }

    /// `P:upload-expiry`: ZSET of unfinished upload session keys scored by their `expire_time`,
    /// in a slot of its own (a hint for the janitor, written beside the scripts).
    pub(super) fn upload_expiry(&self) -> String {
        format!("{}:upload-expiry", self.prefix)
    }

    /// `P:files-unchecked`: ZSET of file ids scored by their record's `create_time`, until the
    /// orphan janitor checked that the file's object exists.
    pub(super) fn unchecked_files(&self) -> String {
        format!("{}:files-unchecked", self.prefix)
    }

    /// `P:{f:FILE}:file`: a file's metadata record (JSON), expiring with the file.
    pub(super) fn file(&self, file_id: &FileId) -> String {
        format!("{}:{{f:{file_id}}}:file", self.prefix)
    }
}

/// The keys of one conversation: `P:{c:C}:<name>`.
#[derive(Debug, Clone)]
pub(super) struct ConversationKeys {
    base: String,
}

impl ConversationKeys {
    /// `P:{c:C}:`, from which the scripts build the per-sender keys of the trimming pass.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    /// The pub/sub channel the conversation's committed events are published on (see
    /// [`super::live`]). It carries the hash tag too, so it could become a shard channel.
    pub(super) fn channel(&self) -> String {
        self.key("live")
    }

    /// HASH: title, created_by, create_time, last_seq, trimmed_through, fingerprint, joins.
    pub(super) fn meta(&self) -> String {
        self.key("meta")
    }

    /// ZSET of participants scored by join order.
    pub(super) fn members(&self) -> String {
        self.key("members")
    }

    /// ZSET of events, score = sequence, member = `<seq>:<create_time_ms>:<json EventKind>`.
    pub(super) fn events(&self) -> String {
        self.key("events")
    }

    /// ZSET of message ids (tombstones included) scored by sequence.
    pub(super) fn history(&self) -> String {
        self.key("msgs")
    }

    /// HASH message id -> `<seq>:<create_time_ms>:<json MessageRecord>`.
    pub(super) fn messages(&self) -> String {
        self.key("msg")
    }

    /// ZSET of the sequences of deleted messages (member and score).
    pub(super) fn deleted(&self) -> String {
        self.key("dead")
    }

    /// SET of users with a `by:<user>` ZSET.
    pub(super) fn senders(&self) -> String {
        self.key("senders")
    }

    /// HASH user -> read sequence.
    pub(super) fn reads(&self) -> String {
        self.key("read")
    }

    /// ZSET of the sequences of one sender's non-deleted messages (member and score).
    pub(super) fn sent_by(&self, user: &UserId) -> String {
        format!("{}by:{}", self.base, user.as_str())
    }

    /// The field remembering a `(sender, client_message_id)` in the idempotency buckets
    /// `P:{c:C}:idem:<n>` (HASHes the append script names from the key base; see
    /// `append_message.lua`). The sender's length comes first because user ids may contain ':'.
    pub(super) fn idempotency_field(sender: &UserId, client_message_id: &str) -> String {
        let sender = sender.as_str();
        format!("{}:{sender}:{client_message_id}", sender.len())
    }

    /// HASH of the messages carrying one file (`m:<message id>` -> sequence), and `gone` once the
    /// file was deleted; expires with the file. File ids are server-made UUIDs.
    pub(super) fn file_messages(&self, file_id: &FileId) -> String {
        format!("{}file:{file_id}", self.base)
    }

    /// The eight keys every write script takes first (see `prelude.lua`).
    pub(super) fn for_write(&self) -> Vec<String> {
        vec![
            self.meta(),
            self.members(),
            self.events(),
            self.history(),
            self.messages(),
            self.deleted(),
            self.senders(),
            self.reads(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_share_one_hash_tag() {
        let keys = Keys::new("svcmsg");
        let id = ConversationId::parse("0190a4d6-0000-7000-8000-000000000001").unwrap();
        let user = UserId::parse("a:b{x}").unwrap();
        let conversation = keys.conversation(id);
        let tag = format!("{{c:{id}}}");
        for key in conversation.for_write().into_iter().chain([
            conversation.sent_by(&user),
            conversation
                .file_messages(&FileId::parse("0190a4d6-0000-7000-8000-000000000002").unwrap()),
        ]) {
            assert!(key.starts_with(&format!("svcmsg:{tag}:")), "{key}");
        }
        assert_eq!(
            ConversationKeys::idempotency_field(&user, "m-1"),
            "6:a:b{x}:m-1"
        );
        assert_ne!(
            ConversationKeys::idempotency_field(&UserId::parse("a").unwrap(), "b:c"),
            ConversationKeys::idempotency_field(&UserId::parse("a:b").unwrap(), "c")
        );
        assert_eq!(keys.user_conversations(&user), "svcmsg:{u:a:b{x}}:convs");
        let request = keys.create_request(&user, "r-1");
        assert!(request.starts_with("svcmsg:{u:a:b{x}}:req:"), "{request}");
        // A user id ending like a key's middle cannot reach another user's request.
        assert_ne!(
            keys.create_request(&UserId::parse("a}:req:b").unwrap(), "c"),
            keys.create_request(&UserId::parse("a").unwrap(), "b}:req:c")
        );
        let upload = keys.upload_session(&user, "r-1");
        assert!(upload.starts_with("svcmsg:{u:a:b{x}}:upload:"), "{upload}");
        assert_eq!(keys.user_uploads(&user), "svcmsg:{u:a:b{x}}:uploads");
        assert_ne!(
            keys.upload_session(&UserId::parse("a}:upload:b").unwrap(), "c"),
            keys.upload_session(&UserId::parse("a").unwrap(), "b}:upload:c")
        );
    }
}
