//! The Lua scripts, run with `EVALSHA` (loaded again on `NOSCRIPT`, e.g. after a failover or
//! `SCRIPT FLUSH`). Write scripts share `prelude.lua`; see each `.lua` file for its contract.

use fred::{clients::Client, types::scripts::Script};

use crate::store::messages::{Rejection, StoreError};

const PRELUDE: &str = include_str!("prelude.lua");
const UPLOAD_PRELUDE: &str = include_str!("upload_prelude.lua");

/// One script with its cached SHA-1.
pub(super) struct LuaScript {
    name: &'static str,
    script: Script,
}

impl LuaScript {
    fn read_only(name: &'static str, lua: &'static str) -> Self {
        Self {
            name,
            script: Script::from_lua(lua),
        }
    }

    /// A script without the conversation prelude that may write (its keys are not a
    /// conversation's).
    fn standalone(name: &'static str, lua: &'static str) -> Self {
        Self::read_only(name, lua)
    }

    fn write(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            script: Script::from_lua(format!("{PRELUDE}\n{body}")),
        }
    }

    /// A script over one upload session's keys (see `upload_prelude.lua`).
    fn upload(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            script: Script::from_lua(format!("{UPLOAD_PRELUDE}\n{body}")),
        }
    }

    /// Runs the script; every script replies with an array of strings.
    pub(super) async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply, StoreError> {
        let fields: Vec<String> = self
            .script
            .evalsha_with_reload(client, keys, args)
            .await
            .map_err(StoreError::from)?;
        Ok(Reply {
            script: self.name,
            fields,
        })
    }
}

/// A script's reply: a status word, then fields that depend on it.
pub(super) struct Reply {
    script: &'static str,
    fields: Vec<String>,
}

impl Reply {
    pub(super) fn status(&self) -> &str {
        self.fields.first().map_or("", String::as_str)
    }

    /// Everything after the status.
    pub(super) fn rest(&self) -> &[String] {
        self.fields.get(1..).unwrap_or_default()
    }

    /// The `index`-th field after the status.
    pub(super) fn field(&self, index: usize) -> Result<&str, StoreError> {
        self.rest()
            .get(index)
            .map(String::as_str)
            .ok_or_else(|| self.unexpected())
    }

    /// All fields, status included (for scripts without a status word).
    pub(super) fn into_fields(self) -> Vec<String> {
        self.fields
    }

    /// The status as a rejection, or a corrupt-reply error for anything else.
    pub(super) fn rejection(&self) -> StoreError {
        let rejection = match self.status() {
            "conversation_not_found" => Rejection::ConversationNotFound,
            "message_not_found" => Rejection::MessageNotFound,
            "not_participant" => Rejection::NotParticipant,
            "not_creator" => Rejection::NotCreator,
            "not_sender" => Rejection::NotSender,
            "participant_not_found" => Rejection::ParticipantNotFound,
            "sequence_ahead" => Rejection::SequenceAhead,
            "too_many_participants" => Rejection::TooManyParticipants,
            "file_deleted" => Rejection::FileDeleted,
            _ => return self.unexpected(),
        };
        StoreError::Rejected(rejection)
    }

    pub(super) fn unexpected(&self) -> StoreError {
        StoreError::Corrupt(format!(
            "unexpected reply from script {}: status {:?}, {} fields",
            self.script,
            self.status(),
            self.fields.len()
        ))
    }
}

pub(super) struct Scripts {
    pub(super) claim_request: LuaScript,
    pub(super) reserve_conversation: LuaScript,
    pub(super) forget_stale_conversation: LuaScript,
    pub(super) create_conversation: LuaScript,
    pub(super) add_participants: LuaScript,
    pub(super) remove_participant: LuaScript,
    pub(super) append_message: LuaScript,
    pub(super) delete_message: LuaScript,
    pub(super) delete_file_messages: LuaScript,
    pub(super) file_messages: LuaScript,
    pub(super) mark_read: LuaScript,
    pub(super) load_conversation: LuaScript,
    pub(super) events_after: LuaScript,
    pub(super) messages_before: LuaScript,
    pub(super) read_state: LuaScript,
    pub(super) upload_open: LuaScript,
    pub(super) upload_acquire: LuaScript,
    pub(super) upload_update: LuaScript,
    pub(super) upload_renew: LuaScript,
    pub(super) upload_release: LuaScript,
    pub(super) upload_remove: LuaScript,
    pub(super) upload_retire: LuaScript,
}

impl Scripts {
    /// Loads every script into the server's cache (on every primary of a cluster), so the first
    /// calls need no `NOSCRIPT` round trip and a script that does not compile fails start-up.
    pub(super) async fn load(&self, client: &Client) -> Result<(), StoreError> {
        for script in [
            &self.claim_request,
            &self.reserve_conversation,
            &self.forget_stale_conversation,
            &self.create_conversation,
            &self.add_participants,
            &self.remove_participant,
            &self.append_message,
            &self.delete_message,
            &self.delete_file_messages,
            &self.file_messages,
            &self.mark_read,
            &self.load_conversation,
            &self.events_after,
            &self.messages_before,
            &self.read_state,
            &self.upload_open,
            &self.upload_acquire,
            &self.upload_update,
            &self.upload_renew,
            &self.upload_release,
            &self.upload_remove,
            &self.upload_retire,
        ] {
            script.script.load(client).await.map_err(|error| {
                tracing::error!(script = script.name, %error, "loading a redis script failed");
                StoreError::from(error)
            })?;
        }
        Ok(())
    }

    pub(super) fn new() -> Self {
        Self {
            claim_request: LuaScript::standalone(
                "claim_request",
                include_str!("claim_request.lua"),
            ),
            reserve_conversation: LuaScript::standalone(
                "reserve_conversation",
                include_str!("reserve_conversation.lua"),
            ),
            forget_stale_conversation: LuaScript::standalone(
                "forget_stale_conversation",
                include_str!("forget_stale_conversation.lua"),
            ),
            create_conversation: LuaScript::write(
                "create_conversation",
                include_str!("create_conversation.lua"),
            ),
            add_participants: LuaScript::write(
                "add_participants",
                include_str!("add_participants.lua"),
            ),
            remove_participant: LuaScript::write(
                "remove_participant",
                include_str!("remove_participant.lua"),
            ),
            append_message: LuaScript::write("append_message", include_str!("append_message.lua")),
            delete_message: LuaScript::write("delete_message", include_str!("delete_message.lua")),
            delete_file_messages: LuaScript::write(
                "delete_file_messages",
                include_str!("delete_file_messages.lua"),
            ),
            file_messages: LuaScript::read_only("file_messages", include_str!("file_messages.lua")),
            mark_read: LuaScript::write("mark_read", include_str!("mark_read.lua")),
            load_conversation: LuaScript::read_only(
                "load_conversation",
                include_str!("load_conversation.lua"),
            ),
            events_after: LuaScript::read_only("events_after", include_str!("events_after.lua")),
            messages_before: LuaScript::read_only(
                "messages_before",
                include_str!("messages_before.lua"),
            ),
            read_state: LuaScript::read_only("read_state", include_str!("read_state.lua")),
            upload_open: LuaScript::upload("upload_open", include_str!("upload_open.lua")),
            upload_acquire: LuaScript::upload("upload_acquire", include_str!("upload_acquire.lua")),
            upload_update: LuaScript::upload("upload_update", include_str!("upload_update.lua")),
            upload_renew: LuaScript::upload("upload_renew", include_str!("upload_renew.lua")),
            upload_release: LuaScript::upload("upload_release", include_str!("upload_release.lua")),
            upload_remove: LuaScript::upload("upload_remove", include_str!("upload_remove.lua")),
            upload_retire: LuaScript::upload("upload_retire", include_str!("upload_retire.lua")),
        }
    }
}
