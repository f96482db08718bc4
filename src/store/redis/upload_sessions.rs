//! Upload sessions in Redis, shared by every replica.
//!
//! | key                            | type | contents                                                     |
//! |--------------------------------|------|--------------------------------------------------------------|
//! | `P:{u:USER}:upload:<digest>`   | HASH | state (JSON), holder, until, committed, complete, expire      |
//! | `P:{u:USER}:uploads`           | ZSET | the owner's unfinished sessions (digest), score = expire_time |
//! | `P:upload-expiry`              | ZSET | unfinished session keys, score = expire_time                  |
//!
//! `<digest>` is the hex SHA-256 of the owner and the request id, length-prefixed (as for
//! `P:{u:USER}:req:`). A session and its owner's index share the slot `{u:USER}`, so each call is
//! one script there (see `upload_prelude.lua`). Leases compare the lease end with the `now` the
//! caller passes (the store reads no clock); `update` and `renew` are fenced by the holder, which
//! keeps its lease until it releases it or another writer takes it over. The session key expires
//! [`SESSION_GRACE_MS`] after `expire_time` (`PEXPIREAT`), so a session nobody removes still
//! leaves Redis, while the janitor can read it right after it expired.
//!
//! An expired, unfinished session is handed to the janitor under its [`retired_request_id`]
//! (`upload_retire.lua`, indexed before the move): [`UploadSessionStore::expired`] moves each due
//! session there before listing it, and `open` moves one it finds in the way, then runs again.
//! So the janitor's `remove` never reaches an upload that reuses the request id, a late writer
//! of the expired session gets `LeaseLost`, and staged bytes are never forgotten.
//!
//! `P:upload-expiry` lives in a slot of its own and is written beside the scripts: a session
//! is added once `open` created it and again with every unfinished `update` (sent together with
//! the update's script, so no extra wait), and dropped after it completes or is removed. Refused
//! calls add nothing, so callers cannot grow it. It is a hint: [`UploadSessionStore::expired`]
//! re-reads every session it names, drops entries whose session is gone or complete, and moves
//! those not yet expired to their real expiry.

use std::collections::HashSet;

use async_trait::async_trait;
use fred::prelude::{HashesInterface, SortedSetsInterface};
use futures::future::try_join_all;

use super::RedisMessageStore;
use crate::{
    ids::UserId,
    messaging::model::UnixMillis,
    store::{
        fs_sessions::{is_retired, retired_request_id, session_digest},
        messages::StoreError,
        upload_sessions::{
            Lease, Opened, SessionError, SessionResult, StagedWrite, UploadSession,
            UploadSessionStore,
        },
    },
};

/// How long a session key outlives its `expire_time` in Redis: the janitor's window to abort
/// its staged bytes before Redis forgets where they are.
pub const SESSION_GRACE_MS: i64 = 60 * 60 * 1000;
/// Runs of the open script: one, another after retiring an expired session in the way, and a
/// last one if that session changed meanwhile.
const OPEN_ATTEMPTS: usize = 3;
/// Most expiry-index entries one `expired` round trip reads.
const EXPIRY_PAGE: usize = 200;
/// Rounds of `expired` before it returns what it found (each round removes or moves every stale
/// entry it met, so more rounds are only needed while others write the index).
const EXPIRY_ROUNDS: usize = 50;

impl RedisMessageStore {
    /// The session's key and digest.
    fn session_names(&self, owner: &UserId, request_id: &str) -> (String, String) {
        (
            self.keys.upload_session(owner, request_id),
            session_digest(owner, request_id),
        )
    }

    /// When the session's key and its owner's index of unfinished sessions disappear from
    /// Redis (Unix ms): `None` for a key that does not exist, `-1` for one that never would.
    /// Only the tests ask (feature `testsuite`).
    #[cfg(any(test, feature = "testsuite"))]
    pub async fn upload_key_expiries(
        &self,
        owner: &UserId,
        request_id: &str,
    ) -> Result<(Option<i64>, Option<i64>), StoreError> {
        use fred::prelude::KeysInterface;
        let session: i64 = self
            .client
            .pexpire_time(self.keys.upload_session(owner, request_id))
            .await?;
        let index: i64 = self
            .client
            .pexpire_time(self.keys.user_uploads(owner))
            .await?;
        let existing = |at: i64| (at != -2).then_some(at);
        Ok((existing(session), existing(index)))
    }

    /// Moves the expired, unfinished session stored under `key` (read as `state`) to its
    /// retired name, indexed for the janitor first, unless it changed meanwhile; returns it
    /// under that name when it moved, with the retired name's key.
    async fn retire(
        &self,
        key: &str,
        state: &str,
    ) -> Result<Option<(String, UploadSession)>, StoreError> {
        let mut retired = decode(state)?;
        let digest = session_digest(&retired.owner, &retired.request_id);
        retired.request_id = retired_request_id(&retired.request_id, &retired.file_id);
        let retired_key = self
            .keys
            .upload_session(&retired.owner, &retired.request_id);
        let _: i64 = self
            .client
            .zadd(
                self.keys.upload_expiry(),
                None,
                None,
                false,
                false,
                (retired.expire_time as f64, retired_key.as_str()),
            )
            .await?;
        let reply = self
            .scripts
            .upload_retire
            .run(
                &self.client,
                vec![
                    key.to_owned(),
                    self.keys.user_uploads(&retired.owner),
                    retired_key.clone(),
                ],
                vec![
                    state.to_owned(),
                    encode(&retired)?,
                    retired.committed_size.to_string(),
                    retired.expire_time.to_string(),
                    SESSION_GRACE_MS.to_string(),
                    digest,
                ],
            )
            .await?;
        match reply.status() {
            "retired" => Ok(Some((retired_key, retired))),
            "changed" => Ok(None),
            _ => Err(reply.unexpected()),
        }
    }

    /// Lists the session under `key` in the expiry index. A failure is logged, not returned: the
    /// session's next update writes the entry again.
    async fn index_expiry(&self, key: &str, expire_time: UnixMillis) {
        let added: Result<i64, _> = self
            .client
            .zadd(
                self.keys.upload_expiry(),
                None,
                None,
                false,
                false,
                (expire_time as f64, key),
            )
            .await;
        if let Err(error) = added {
            tracing::warn!(%error, "upload expiry index update failed");
        }
    }

    /// Entries in the expiry index. Only the tests ask (feature `testsuite`).
    #[cfg(any(test, feature = "testsuite"))]
    pub async fn upload_expiry_index_len(&self) -> Result<u64, StoreError> {
        Ok(self.client.zcard(self.keys.upload_expiry()).await?)
    }

    /// The session stored under `key` (a member of the expiry index), if any, with its JSON as
    /// stored.
    async fn session_at(&self, key: &str) -> Result<Option<(String, UploadSession)>, StoreError> {
        let state: Option<String> = self.client.hget(key, "state").await?;
        state
            .map(|state| decode(&state).map(|session| (state, session)))
            .transpose()
    }
}

#[async_trait]
impl UploadSessionStore for RedisMessageStore {
    async fn open(
        &self,
        new: &UploadSession,
        lease: Lease<'_>,
        now: UnixMillis,
        max_open: u32,
    ) -> SessionResult<Opened> {
        let (key, digest) = self.session_names(&new.owner, &new.request_id);
        let (holder, until) = if new.complete {
            ("", 0)
        } else {
            (lease.holder, lease.until)
        };
        let json = encode(new)?;
        // A retired session is out of the way, so the second attempt decides; a third covers
        // a session that changed in between.
        for _ in 0..OPEN_ATTEMPTS {
            let reply = self
                .scripts
                .upload_open
                .run(
                    &self.client,
                    vec![key.clone(), self.keys.user_uploads(&new.owner)],
                    vec![
                        json.clone(),
                        holder.to_owned(),
                        until.to_string(),
                        now.to_string(),
                        max_open.to_string(),
                        new.committed_size.to_string(),
                        flag(new.complete),
                        new.expire_time.to_string(),
                        SESSION_GRACE_MS.to_string(),
                        digest.clone(),
                    ],
                )
                .await?;
            return match reply.status() {
                "created" => {
                    if !new.complete {
                        self.index_expiry(&key, new.expire_time).await;
                    }
                    Ok(Opened::Created)
                }
                "existing" => Ok(Opened::Existing(decode(reply.field(0)?)?)),
                "busy" => Err(SessionError::Busy),
                "too_many" => Err(SessionError::TooMany { limit: max_open }),
                "retire" => {
                    self.retire(&key, reply.field(0)?).await?;
                    continue;
                }
                _ => Err(reply.unexpected().into()),
            };
        }
        Err(StoreError::Unavailable(
            "the upload session kept changing while it was being opened".into(),
        )
        .into())
    }

    async fn acquire(
        &self,
        owner: &UserId,
        request_id: &str,
        lease: Lease<'_>,
        now: UnixMillis,
    ) -> SessionResult<Option<UploadSession>> {
        let (key, _) = self.session_names(owner, request_id);
        let reply = self
            .scripts
            .upload_acquire
            .run(
                &self.client,
                vec![key, self.keys.user_uploads(owner)],
                vec![
                    lease.holder.to_owned(),
                    lease.until.to_string(),
                    now.to_string(),
                ],
            )
            .await?;
        match reply.status() {
            "none" => Ok(None),
            "found" => Ok(Some(decode(reply.field(0)?)?)),
            "busy" => Err(SessionError::Busy),
            _ => Err(reply.unexpected().into()),
        }
    }

    async fn get(
        &self,
        owner: &UserId,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Option<UploadSession>, StoreError> {
        let (key, _) = self.session_names(owner, request_id);
        Ok(self
            .session_at(&key)
            .await?
            .map(|(_, session)| session)
            .filter(|session| session.expire_time > now))
    }

    async fn update(&self, session: &UploadSession, lease: Lease<'_>) -> SessionResult<()> {
        let (key, digest) = self.session_names(&session.owner, &session.request_id);
        let script = self.scripts.upload_update.run(
            &self.client,
            vec![key.clone(), self.keys.user_uploads(&session.owner)],
            vec![
                encode(session)?,
                lease.holder.to_owned(),
                lease.until.to_string(),
                session.committed_size.to_string(),
                flag(session.complete),
                session.expire_time.to_string(),
                SESSION_GRACE_MS.to_string(),
                digest,
            ],
        );
        // An unfinished session is (re)indexed beside every update, in the same round trip:
        // this repairs an entry its `open` failed to write, and a stale entry written for an
        // update that turns out refused is dropped by `expired`.
        let reply = if session.complete {
            script.await?
        } else {
            let (reply, ()) = tokio::join!(script, self.index_expiry(&key, session.expire_time));
            reply?
        };
        match reply.status() {
            "updated" => {}
            "lease_lost" => return Err(SessionError::LeaseLost),
            _ => return Err(reply.unexpected().into()),
        }
        if session.complete {
            let removed: Result<i64, _> = self
                .client
                .zrem(self.keys.upload_expiry(), key.as_str())
                .await;
            if let Err(error) = removed {
                // The session stands; `expired` drops the entry when it meets it.
                tracing::warn!(%error, "upload expiry index update failed");
            }
        }
        Ok(())
    }

    async fn renew(&self, owner: &UserId, request_id: &str, lease: Lease<'_>) -> SessionResult<()> {
        let (key, _) = self.session_names(owner, request_id);
        let reply = self
            .scripts
            .upload_renew
            .run(
                &self.client,
                vec![key, self.keys.user_uploads(owner)],
                vec![lease.holder.to_owned(), lease.until.to_string()],
            )
            .await?;
        match reply.status() {
            "renewed" => Ok(()),
            "lease_lost" => Err(SessionError::LeaseLost),
            _ => Err(reply.unexpected().into()),
        }
    }

    async fn release(
        &self,
        owner: &UserId,
        request_id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        let (key, _) = self.session_names(owner, request_id);
        let reply = self
            .scripts
            .upload_release
            .run(
                &self.client,
                vec![key, self.keys.user_uploads(owner)],
                vec![holder.to_owned()],
            )
            .await?;
        match reply.status() {
            "released" | "unchanged" => Ok(()),
            _ => Err(reply.unexpected()),
        }
    }

    async fn remove(&self, owner: &UserId, request_id: &str) -> Result<(), StoreError> {
        let (key, digest) = self.session_names(owner, request_id);
        let reply = self
            .scripts
            .upload_remove
            .run(
                &self.client,
                vec![key.clone(), self.keys.user_uploads(owner)],
                vec![digest],
            )
            .await?;
        if reply.status() != "removed" {
            return Err(reply.unexpected());
        }
        let _: i64 = self
            .client
            .zrem(self.keys.upload_expiry(), key.as_str())
            .await?;
        Ok(())
    }

    async fn expired(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<UploadSession>, StoreError> {
        let index = self.keys.upload_expiry();
        let mut found = Vec::new();
        // Index entries met in this call: listed, unreadable (left for an operator) or being
        // retired; every other entry met is removed or moved past `now`, so each round reads
        // entries it has not seen.
        let mut seen = HashSet::new();
        for _ in 0..EXPIRY_ROUNDS {
            if found.len() >= limit {
                break;
            }
            let wanted = (limit - found.len()).min(EXPIRY_PAGE);
            let count = seen.len() + wanted;
            let members: Vec<String> = self
                .client
                .zrangebyscore(
                    &index,
                    "-inf".to_owned(),
                    now,
                    false,
                    Some((0, i64::try_from(count).unwrap_or(i64::MAX))),
                )
                .await?;
            let fresh: Vec<String> = members
                .iter()
                .filter(|key| !seen.contains(*key))
                .cloned()
                .collect();
            if fresh.is_empty() {
                break;
            }
            let sessions = try_join_all(fresh.iter().map(|key| async move {
                // A session that cannot be decoded is kept in the index and skipped, so one bad
                // record does not stop the janitor.
                match self.session_at(key).await {
                    Err(StoreError::Corrupt(error)) => {
                        tracing::warn!(error, "skipping an unreadable upload session");
                        Ok(Err(()))
                    }
                    other => other.map(Ok),
                }
            }))
            .await?;
            for (key, session) in fresh.into_iter().zip(sessions) {
                seen.insert(key.clone());
                let (state, session) = match session {
                    // Unreadable: left in the index, skipped.
                    Err(()) => continue,
                    Ok(Some(stored)) => stored,
                    // Gone: nothing left for the janitor.
                    Ok(None) => {
                        let _: i64 = self.client.zrem(&index, key.as_str()).await?;
                        continue;
                    }
                };
                if session.complete {
                    let _: i64 = self.client.zrem(&index, key.as_str()).await?;
                } else if session.expire_time > now {
                    let _: i64 = self
                        .client
                        .zadd(
                            &index,
                            None,
                            None,
                            false,
                            false,
                            (session.expire_time as f64, key.as_str()),
                        )
                        .await?;
                } else if is_retired(&session.request_id) {
                    found.push(session);
                } else if let Some((retired_key, retired)) = self.retire(&key, &state).await? {
                    // Listed under its retired name only: whatever reuses the request id now
                    // is another session, which the janitor's remove cannot reach.
                    let _: i64 = self.client.zrem(&index, key.as_str()).await?;
                    seen.insert(retired_key);
                    found.push(retired);
                }
            }
            if members.len() < count {
                break;
            }
        }
        Ok(found)
    }

    async fn unfinished_writes(&self, limit: usize) -> Result<Vec<StagedWrite>, StoreError> {
        // The expiry index names every unfinished session, live or expired, until the session
        // janitor removes it.
        let keys: Vec<String> = self
            .client
            .zrangebyscore(
                self.keys.upload_expiry(),
                "-inf".to_owned(),
                "+inf".to_owned(),
                false,
                Some((0, i64::try_from(limit).unwrap_or(i64::MAX))),
            )
            .await?;
        // An unreadable session may still stage bytes: the error makes the janitor leave staged
        // bytes alone this round.
        let sessions = try_join_all(keys.iter().map(|key| async move {
            Ok::<_, StoreError>(self.session_at(key).await?.map(|(_, session)| session))
        }))
        .await?;
        Ok(sessions
            .into_iter()
            .flatten()
            .filter(|session| !session.complete)
            .map(|session| StagedWrite {
                blob_key: session.blob_key,
                upload_id: session.staged.upload_id,
            })
            .collect())
    }
}

fn encode(session: &UploadSession) -> Result<String, StoreError> {
    serde_json::to_string(session)
        .map_err(|error| StoreError::Corrupt(format!("upload session: {error}")))
}

fn decode(json: &str) -> Result<UploadSession, StoreError> {
    serde_json::from_str(json)
        .map_err(|error| StoreError::Corrupt(format!("upload session: {error}")))
}

fn flag(set: bool) -> String {
    if set { "1" } else { "0" }.to_owned()
}
