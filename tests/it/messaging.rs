//! MessagingService over gRPC, end to end: validation, participation, idempotency, history,
//! read state, and live subscriptions (seamless replay, resume, removal, slow consumers).
//! Every scenario runs against the in-process store and against the real Redis.

use std::time::Duration;

use crate::support::{TestServer, as_user, history, reason, text_request};
use futures::StreamExt;
use svc_messaging::{config::Settings, grpc::pb};
use tonic::{Code, Streaming, transport::Channel};

type Client = pb::messaging_service_client::MessagingServiceClient<Channel>;

async fn client(server: &TestServer) -> Client {
    Client::new(server.channel().await)
}

async fn create(client: &mut Client, creator: &str, others: &[&str]) -> pb::Conversation {
    client
        .create_conversation(as_user(
            creator,
            pb::CreateConversationRequest {
                title: "Launch".to_owned(),
                participant_ids: others.iter().map(|s| (*s).to_owned()).collect(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create conversation")
        .into_inner()
        .conversation
        .unwrap()
}

async fn send(client: &mut Client, user: &str, conversation_id: &str, body: &str) -> pb::Message {
    let client_id = format!("c-{}", uuid_like());
    client
        .send_message(as_user(
            user,
            text_request(conversation_id, &client_id, body),
        ))
        .await
        .expect("send")
        .into_inner()
        .message
        .unwrap()
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn subscribe(
    client: &mut Client,
    user: &str,
    conversation_id: &str,
    after_sequence: u64,
) -> Streaming<pb::SubscribeMessagesResponse> {
    client
        .subscribe_messages(as_user(
            user,
            pb::SubscribeMessagesRequest {
                conversation_id: conversation_id.to_owned(),
                after_sequence,
            },
        ))
        .await
        .expect("subscribe")
        .into_inner()
}

async fn next_event(
    stream: &mut Streaming<pb::SubscribeMessagesResponse>,
) -> pb::ConversationEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5s")
        .expect("stream open")
        .expect("no error")
        .event
        .unwrap()
}

async fn next_error(stream: &mut Streaming<pb::SubscribeMessagesResponse>) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("stream ends within 5s")
        {
            Some(Ok(_)) => continue,
            Some(Err(status)) => return status,
            None => panic!("stream ended without a status"),
        }
    }
}

fn text_of(event: &pb::ConversationEvent) -> Option<&str> {
    match event.event.as_ref()? {
        pb::conversation_event::Event::MessageCreated(created) => {
            created.message.as_ref().map(|m| m.text.as_str())
        }
        _ => None,
    }
}

pub async fn validation_errors_name_the_field(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let conversation = create(&mut client, "alice", &["bob"]).await;
    let id = conversation.conversation_id.as_str();
    let cases = [
        (text_request(id, "m1", "   "), "text"),
        (text_request(id, "m1", &"x".repeat(4001)), "text"),
        (text_request(id, "", "hi"), "client_message_id"),
        (text_request(id, &"x".repeat(65), "hi"), "client_message_id"),
        (text_request("not-a-uuid", "m1", "hi"), "conversation_id"),
        (
            pb::SendMessageRequest {
                conversation_id: id.to_owned(),
                client_message_id: "m1".to_owned(),
                content: None,
            },
            "content",
        ),
    ];
    for (request, field) in cases {
        let status = client
            .send_message(as_user("alice", request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        use tonic_types::StatusExt;
        let violations = status.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(violations.field_violations[0].field, field);
    }
    // 4000 characters (not bytes) after trimming are fine.
    let long = format!("  {}  ", "é".repeat(4000));
    let message = client
        .send_message(as_user("alice", text_request(id, "long", &long)))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(message.text.chars().count(), 4000);

    for (page_size, page_token) in [(-1, ""), (10, "bogus-token")] {
        let status = client
            .list_messages(as_user(
                "alice",
                pb::ListMessagesRequest {
                    conversation_id: id.to_owned(),
                    page_size,
                    page_token: page_token.to_owned(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let status = client
        .create_conversation(as_user(
            "alice",
            pb::CreateConversationRequest {
                title: "x".repeat(201),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .send_message(as_user(
            "alice",
            pb::SendMessageRequest {
                conversation_id: id.to_owned(),
                client_message_id: "f1".to_owned(),
                content: Some(pb::send_message_request::Content::FileId(
                    "no-such-file".to_owned(),
                )),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "FILE_NOT_FOUND");
}

pub async fn only_participants_read_or_write(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let conversation = create(&mut client, "alice", &["bob"]).await;
    let id = conversation.conversation_id.clone();
    send(&mut client, "alice", &id, "hello").await;
    let denied = [
        client
            .get_conversation(as_user(
                "mallory",
                pb::GetConversationRequest {
                    conversation_id: id.clone(),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .send_message(as_user("mallory", text_request(&id, "m", "hi")))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .list_messages(as_user(
                "mallory",
                pb::ListMessagesRequest {
                    conversation_id: id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .subscribe_messages(as_user(
                "mallory",
                pb::SubscribeMessagesRequest {
                    conversation_id: id.clone(),
                    after_sequence: 0,
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .mark_read(as_user(
                "mallory",
                pb::MarkReadRequest {
                    conversation_id: id.clone(),
                    sequence: 1,
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        client
            .add_participants(as_user(
                "mallory",
                pb::AddParticipantsRequest {
                    conversation_id: id.clone(),
                    user_ids: vec!["mallory".to_owned()],
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(reason(&status), "NOT_A_PARTICIPANT");
    }
    let unknown = client
        .get_conversation(as_user(
            "alice",
            pb::GetConversationRequest {
                conversation_id: "0190a4b8-0000-7000-8000-000000000000".to_owned(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // bob may not remove alice; alice (the creator) may remove bob, who then cannot read.
    let status = client
        .remove_participant(as_user(
            "bob",
            pb::RemoveParticipantRequest {
                conversation_id: id.clone(),
                user_id: "alice".to_owned(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "NOT_CONVERSATION_CREATOR");
    client
        .remove_participant(as_user(
            "alice",
            pb::RemoveParticipantRequest {
                conversation_id: id.clone(),
                user_id: "bob".to_owned(),
            },
        ))
        .await
        .unwrap();
    let status = client
        .list_messages(as_user(
            "bob",
            pb::ListMessagesRequest {
                conversation_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

pub async fn retries_are_idempotent(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let request = pb::CreateConversationRequest {
        title: "Retry me".to_owned(),
        participant_ids: vec!["bob".to_owned()],
        request_id: format!("req-{}", uuid_like()),
    };
    let first = client
        .create_conversation(as_user("alice", request.clone()))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    let again = client
        .create_conversation(as_user("alice", request.clone()))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(first.conversation_id, again.conversation_id);
    let conflict = client
        .create_conversation(as_user(
            "alice",
            pb::CreateConversationRequest {
                title: "Something else".to_owned(),
                ..request
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert_eq!(reason(&conflict), "REQUEST_ID_REUSED");

    let id = first.conversation_id;
    // Concurrent retries of one send: one message, every caller gets it.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let request = text_request(&id, "same-id", "hello once");
        tasks.push(tokio::spawn(async move {
            client
                .send_message(as_user("alice", request))
                .await
                .unwrap()
                .into_inner()
                .message
                .unwrap()
        }));
    }
    let mut messages = Vec::new();
    for task in tasks {
        messages.push(task.await.unwrap());
    }
    assert!(
        messages
            .iter()
            .all(|m| m.message_id == messages[0].message_id)
    );
    assert!(messages.iter().all(|m| m.sequence == messages[0].sequence));
    let conflict = client
        .send_message(as_user(
            "alice",
            text_request(&id, "same-id", "different text"),
        ))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert_eq!(reason(&conflict), "CLIENT_MESSAGE_ID_REUSED");
    let history = history(&mut client, "alice", &id).await;
    assert_eq!(history.len(), 1);
}

/// Issue 9 item 5: a replayed CreateConversation is a read like any other, and its answer is
/// only for participants; the id it lands on cannot be computed from (user, request_id).
pub async fn replayed_creates_check_participation(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let request = pb::CreateConversationRequest {
        title: "Secret plans".to_owned(),
        participant_ids: vec!["bob".to_owned()],
        request_id: "replay-me".to_owned(),
    };
    let created = client
        .create_conversation(as_user("alice", request.clone()))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    let id = created.conversation_id.clone();
    client
        .remove_participant(as_user(
            "alice",
            pb::RemoveParticipantRequest {
                conversation_id: id.clone(),
                user_id: "alice".to_owned(),
            },
        ))
        .await
        .unwrap();
    send(&mut client, "bob", &id, "after alice left").await;
    let status = client
        .create_conversation(as_user("alice", request.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_A_PARTICIPANT");
    assert!(!status.message().contains("after alice left"));

    // Bob's identical request_id is his own: a new conversation.
    let bobs = client
        .create_conversation(as_user("bob", request.clone()))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_ne!(bobs.conversation_id, id);
    // Another server (another store) given the same (user, request_id) picks another id: ids
    // are random, not derived.
    let other = TestServer::start().await;
    let mut other_client = Client::new(other.channel().await);
    let elsewhere = other_client
        .create_conversation(as_user("alice", request))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_ne!(elsewhere.conversation_id, id);
}

/// Subscribes as soon as one of `user`'s subscription slots is free again (it is given back
/// asynchronously, when the server drops the ended stream).
async fn subscribe_once_free(
    client: &mut Client,
    user: &str,
    conversation_id: &str,
) -> Streaming<pb::SubscribeMessagesResponse> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let request = pb::SubscribeMessagesRequest {
            conversation_id: conversation_id.to_owned(),
            after_sequence: 0,
        };
        match client.subscribe_messages(as_user(user, request)).await {
            Ok(stream) => return stream.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no slot came back within 5s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("subscribe: {status:?}"),
        }
    }
}

/// A user may be in `messaging.max_conversations_per_user` conversations (2 here): one more,
/// created or added, is FAILED_PRECONDITION TOO_MANY_CONVERSATIONS.
pub async fn conversations_per_user_are_capped(backend: Backend) {
    let server = backend
        .server_with(|settings| settings.messaging.max_conversations_per_user = 2)
        .await;
    let mut client = client(&server).await;
    create(&mut client, "alice", &["bob"]).await;
    create(&mut client, "carol", &["bob"]).await;
    let status = client
        .create_conversation(as_user(
            "dave",
            pb::CreateConversationRequest {
                title: "third".to_owned(),
                participant_ids: vec!["bob".to_owned()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_CONVERSATIONS");
    {
        use tonic_types::StatusExt;
        let quota = status
            .get_details_quota_failure()
            .expect("QuotaFailure detail");
        assert_eq!(
            quota.violations[0].subject,
            "messaging.max_conversations_per_user"
        );
    }
    let daves = create(&mut client, "dave", &[]).await.conversation_id;
    let status = client
        .add_participants(as_user(
            "dave",
            pb::AddParticipantsRequest {
                conversation_id: daves,
                user_ids: vec!["bob".to_owned()],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_CONVERSATIONS");
}

/// Issue 9 item 8: live subscriptions per caller are limited (the server here allows 2), and a
/// slot comes back however its stream ends.
pub async fn live_subscriptions_per_caller_are_limited(backend: Backend) {
    let server = backend
        .server_with(|settings| settings.messaging.max_subscriptions_per_caller = 2)
        .await;
    use tonic_types::StatusExt;
    let mut client = client(&server).await;
    let mine = create(&mut client, "alice", &["bob"]).await.conversation_id;
    let theirs = create(&mut client, "bob", &["alice"]).await.conversation_id;
    let first = subscribe(&mut client, "alice", &mine, 0).await;
    let mut second = subscribe(&mut client, "alice", &theirs, 0).await;
    let status = client
        .subscribe_messages(as_user(
            "alice",
            pb::SubscribeMessagesRequest {
                conversation_id: mine.clone(),
                after_sequence: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_SUBSCRIPTIONS");
    let quota = status
        .get_details_quota_failure()
        .expect("QuotaFailure detail");
    assert_eq!(
        quota.violations[0].subject,
        "messaging.max_subscriptions_per_caller"
    );
    // Refusals take no slot, and the limit is per caller: bob still subscribes.
    let _bobs = subscribe(&mut client, "bob", &mine, 0).await;

    // The server ends a stream (alice is removed): its slot comes back.
    client
        .remove_participant(as_user(
            "bob",
            pb::RemoveParticipantRequest {
                conversation_id: theirs.clone(),
                user_id: "alice".to_owned(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(next_error(&mut second).await.code(), Code::PermissionDenied);
    let mut third = subscribe_once_free(&mut client, "alice", &mine).await;

    // The client cancels a stream: its slot comes back.
    drop(first);
    let mut fourth = subscribe_once_free(&mut client, "alice", &mine).await;
    send(&mut client, "bob", &mine, "both streams live").await;
    assert_eq!(
        text_of(&next_event(&mut third).await),
        Some("both streams live")
    );
    assert_eq!(
        text_of(&next_event(&mut fourth).await),
        Some("both streams live")
    );
}

type Files = pb::file_relay_service_client::FileRelayServiceClient<Channel>;

fn message_by_id<'a>(messages: &'a [pb::Message], id: &str) -> &'a pb::Message {
    messages
        .iter()
        .find(|message| message.message_id == id)
        .unwrap_or_else(|| panic!("message {id} in history"))
}

/// Issue 9 item 6: DeleteFile tombstones every message carrying the file, re-posts by others
/// included (each with a MessageDeleted event), and no message can carry it afterwards.
/// Deleting only the upload's own FILE message (DeleteMessage) leaves the file and its
/// re-posts alone: a message is one reference to a file; DeleteFile removes the file.
pub async fn delete_file_tombstones_every_copy(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let mut files = Files::new(server.channel().await);
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    let body = b"the launch plan\n".to_vec();
    let uploaded = files
        .upload_file(as_user(
            "alice",
            futures::stream::iter([
                pb::UploadFileRequest {
                    payload: Some(pb::upload_file_request::Payload::Metadata(
                        pb::UploadMetadata {
                            conversation_id: id.clone(),
                            file_name: "plan.txt".to_owned(),
                            content_type: "text/plain".to_owned(),
                            size_bytes: body.len() as i64,
                            sha256: String::new(),
                            caption: String::new(),
                            request_id: String::new(),
                        },
                    )),
                },
                pb::UploadFileRequest {
                    payload: Some(pb::upload_file_request::Payload::Chunk(body.into())),
                },
            ]),
        ))
        .await
        .unwrap()
        .into_inner();
    let file = uploaded.file.unwrap();
    let upload_message = uploaded.message.unwrap();
    let repost = |client_message_id: &str| pb::SendMessageRequest {
        conversation_id: id.clone(),
        client_message_id: client_message_id.to_owned(),
        content: Some(pb::send_message_request::Content::FileId(
            file.file_id.clone(),
        )),
    };
    let bobs = client
        .send_message(as_user("bob", repost("bob-repost")))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    let carried = bobs.file.as_ref().unwrap();
    assert_eq!(
        (
            carried.file_name.as_str(),
            carried.size_bytes,
            carried.sha256.as_str(),
            carried.uploader_id.as_str()
        ),
        ("plan.txt", file.size_bytes, file.sha256.as_str(), "alice")
    );
    let alices = client
        .send_message(as_user("alice", repost("alice-repost")))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();

    // Deleting the upload's own message: the file and the re-posts stay.
    client
        .delete_message(as_user(
            "alice",
            pb::DeleteMessageRequest {
                conversation_id: id.clone(),
                message_id: upload_message.message_id.clone(),
            },
        ))
        .await
        .unwrap();
    let messages = history(&mut client, "bob", &id).await;
    assert!(message_by_id(&messages, &upload_message.message_id).deleted);
    assert!(message_by_id(&messages, &bobs.message_id).file.is_some());
    let file_request = || pb::GetFileRequest {
        file_id: file.file_id.clone(),
    };
    files
        .get_file(as_user("bob", file_request()))
        .await
        .expect("the file outlives its upload message");

    let now = client
        .get_conversation(as_user(
            "bob",
            pb::GetConversationRequest {
                conversation_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .last_sequence;
    let mut live = subscribe(&mut client, "bob", &id, now).await;
    files
        .delete_file(as_user(
            "alice",
            pb::DeleteFileRequest {
                file_id: file.file_id.clone(),
            },
        ))
        .await
        .unwrap();
    let messages = history(&mut client, "bob", &id).await;
    for copy in [&upload_message, &bobs, &alices] {
        let message = message_by_id(&messages, &copy.message_id);
        assert!(message.deleted, "{message:?}");
        assert!(message.file.is_none(), "{message:?}");
    }
    let mut deleted = Vec::new();
    for _ in 0..2 {
        match next_event(&mut live).await.event {
            Some(pb::conversation_event::Event::MessageDeleted(event)) => {
                deleted.push(event.message_id)
            }
            other => panic!("expected MessageDeleted, got {other:?}"),
        }
    }
    deleted.sort();
    let mut expected = vec![bobs.message_id.clone(), alices.message_id.clone()];
    expected.sort();
    assert_eq!(deleted, expected);
    let status = files
        .get_file(as_user("bob", file_request()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .send_message(as_user("bob", repost("too-late")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "FILE_NOT_FOUND");
}

pub async fn history_pages_are_stable_while_messages_arrive(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    for n in 1..=5 {
        send(&mut client, "bob", &id, &format!("m{n}")).await;
    }
    let page = |token: String| pb::ListMessagesRequest {
        conversation_id: id.clone(),
        page_size: 2,
        page_token: token,
    };
    let first = client
        .list_messages(as_user("alice", page(String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>(),
        ["m5", "m4"]
    );
    // New messages arrive between pages: no duplicate, no skip.
    send(&mut client, "bob", &id, "m6").await;
    let second = client
        .list_messages(as_user("alice", page(first.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>(),
        ["m3", "m2"]
    );
    let third = client
        .list_messages(as_user("alice", page(second.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        third
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>(),
        ["m1"]
    );
    assert!(third.next_page_token.is_empty());
}

pub async fn read_state_and_conversation_list(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let quiet = create(&mut client, "alice", &["bob"]).await.conversation_id;
    let busy = create(&mut client, "alice", &["bob"]).await.conversation_id;
    send(&mut client, "bob", &busy, "one").await;
    let two = send(&mut client, "bob", &busy, "two").await;
    send(&mut client, "alice", &busy, "mine").await;
    let listed = client
        .list_conversations(as_user("alice", pb::ListConversationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .conversations
        .iter()
        .map(|c| c.conversation_id.as_str())
        .collect();
    assert_eq!(
        &ids[..2],
        [busy.as_str(), quiet.as_str()],
        "most recent activity first"
    );
    let busy_view = &listed.conversations[0];
    assert_eq!(busy_view.unread_count, 2);
    assert_eq!(busy_view.last_message.as_ref().unwrap().text, "mine");
    let read = client
        .mark_read(as_user(
            "alice",
            pb::MarkReadRequest {
                conversation_id: busy.clone(),
                sequence: two.sequence,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.read_sequence, two.sequence);
    // Monotonic: a lower value is ignored.
    let read = client
        .mark_read(as_user(
            "alice",
            pb::MarkReadRequest {
                conversation_id: busy.clone(),
                sequence: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.read_sequence, two.sequence);
    let view = client
        .get_conversation(as_user(
            "alice",
            pb::GetConversationRequest {
                conversation_id: busy.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(view.unread_count, 0);
    let status = client
        .mark_read(as_user(
            "alice",
            pb::MarkReadRequest {
                conversation_id: busy,
                sequence: 999,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

pub async fn subscribe_replays_then_follows_without_gaps(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    for n in 1..=3 {
        send(&mut client, "alice", &id, &format!("early {n}")).await;
    }
    let mut stream = subscribe(&mut client, "bob", &id, 0).await;
    // Sends race with the replay: every event still arrives once, in order.
    let mut sender = client.clone();
    let sender_id = id.clone();
    let writer = tokio::spawn(async move {
        for n in 1..=20 {
            send(&mut sender, "alice", &sender_id, &format!("late {n}")).await;
        }
    });
    let mut sequences = Vec::new();
    while sequences.len() < 23 {
        sequences.push(next_event(&mut stream).await.sequence);
    }
    writer.await.unwrap();
    assert_eq!(sequences, (1..=23).collect::<Vec<u64>>());

    // Resume from the middle: exactly what came after.
    let mut resumed = subscribe(&mut client, "bob", &id, 10).await;
    let first = next_event(&mut resumed).await;
    assert_eq!(first.sequence, 11);
    assert_eq!(text_of(&first), Some("late 8"));
    // Other kinds of events are part of the stream too.
    client
        .mark_read(as_user(
            "bob",
            pb::MarkReadRequest {
                conversation_id: id.clone(),
                sequence: 5,
            },
        ))
        .await
        .unwrap();
    let mut last = first;
    while last.sequence < 24 {
        last = next_event(&mut resumed).await;
    }
    assert!(matches!(
        last.event,
        Some(pb::conversation_event::Event::ReadReceipt(
            pb::ReadReceipt {
                read_sequence: 5,
                ..
            }
        ))
    ));
    let status = client
        .subscribe_messages(as_user(
            "bob",
            pb::SubscribeMessagesRequest {
                conversation_id: id,
                after_sequence: 999,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

pub async fn removal_ends_the_live_stream(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    let mut stream = subscribe(&mut client, "bob", &id, 0).await;
    send(&mut client, "alice", &id, "before").await;
    assert_eq!(text_of(&next_event(&mut stream).await), Some("before"));
    client
        .remove_participant(as_user(
            "alice",
            pb::RemoveParticipantRequest {
                conversation_id: id.clone(),
                user_id: "bob".to_owned(),
            },
        ))
        .await
        .unwrap();
    let change = next_event(&mut stream).await;
    assert!(matches!(
        change.event,
        Some(pb::conversation_event::Event::ParticipantsChanged(_))
    ));
    let status = next_error(&mut stream).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "NOT_A_PARTICIPANT");
}

pub async fn deleted_messages_are_tombstones(backend: Backend) {
    let server = backend.server().await;
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    let message = send(&mut client, "alice", &id, "oops").await;
    let status = client
        .delete_message(as_user(
            "bob",
            pb::DeleteMessageRequest {
                conversation_id: id.clone(),
                message_id: message.message_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "NOT_MESSAGE_SENDER");
    let tombstone = client
        .delete_message(as_user(
            "alice",
            pb::DeleteMessageRequest {
                conversation_id: id.clone(),
                message_id: message.message_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert!(tombstone.deleted);
    assert!(tombstone.text.is_empty());
    let history = history(&mut client, "bob", &id).await;
    assert!(history[0].deleted);
    assert!(history[0].text.is_empty());
    let mut replay = subscribe(&mut client, "bob", &id, 0).await;
    let created = next_event(&mut replay).await;
    assert_eq!(
        text_of(&created),
        Some(""),
        "the replay shows the tombstone"
    );
    let deleted = next_event(&mut replay).await;
    assert!(matches!(
        deleted.event,
        Some(pb::conversation_event::Event::MessageDeleted(_))
    ));
}

pub async fn slow_consumers_are_cut_off_and_resume(backend: Backend) {
    let server = backend
        .server_with(|settings| settings.messaging.subscriber_buffer = 4)
        .await;
    // The server under test has messaging.subscriber_buffer = 4.
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    // bob's connection advertises the smallest HTTP/2 windows, so the transport holds little.
    let bob_channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .unwrap();
    let mut bob = Client::new(bob_channel);
    let mut stream = subscribe(&mut bob, "bob", &id, 0).await;
    // bob reads nothing while 300 events of ~4 KB are committed: far more than his buffer plus
    // what the transport buffers (~64 KB window + h2's 400 KB send buffer).
    for n in 1..=300 {
        send(
            &mut client,
            "alice",
            &id,
            &format!("flood {n:03} {}", "x".repeat(3990)),
        )
        .await;
    }
    let mut last = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("progress")
        {
            Some(Ok(response)) => {
                let sequence = response.event.unwrap().sequence;
                assert_eq!(sequence, last + 1, "no gap before the cut-off");
                last = sequence;
            }
            Some(Err(status)) => break status,
            None => panic!("stream ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "SLOW_CONSUMER");
    assert!(
        last < 300,
        "the consumer was cut off before the end ({last})"
    );
    // Resuming from the last delivered sequence misses nothing.
    let mut resumed = subscribe(&mut client, "bob", &id, last).await;
    for expected in last + 1..=300 {
        assert_eq!(next_event(&mut resumed).await.sequence, expected);
    }
}

pub async fn truncated_history_is_out_of_range(backend: Backend) {
    let server = backend
        .server_with(|settings| settings.messaging.history_max_events = 5)
        .await;
    // The server under test keeps messaging.history_max_events = 5.
    let mut client = client(&server).await;
    let id = create(&mut client, "alice", &["bob"]).await.conversation_id;
    for n in 1..=8 {
        send(&mut client, "alice", &id, &format!("m{n}")).await;
    }
    let mut stream = subscribe(&mut client, "bob", &id, 1).await;
    let status = next_error(&mut stream).await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status), "HISTORY_TRUNCATED");
    let mut ok = subscribe(&mut client, "bob", &id, 3).await;
    assert_eq!(next_event(&mut ok).await.sequence, 4);
}

/// The message store a scenario's server runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    /// The real Redis, under a key prefix of the scenario's own.
    Redis,
}

impl Backend {
    async fn server(self) -> TestServer {
        self.server_with(|_| {}).await
    }

    /// A server on this backend with the scenario's tuning.
    async fn server_with(self, tune: impl FnOnce(&mut Settings)) -> TestServer {
        TestServer::start_with(|settings| {
            if let Self::Redis = self {
                let prefix = crate::support::unique_prefix("messaging");
                crate::support::use_test_redis(settings, &prefix);
            }
            tune(settings);
        })
        .await
    }
}

crate::support::suite! {
    backends: memory = super::Backend::Memory, redis = super::Backend::Redis;
    tests: [
        validation_errors_name_the_field,
        conversations_per_user_are_capped,
        only_participants_read_or_write,
        retries_are_idempotent(flavor = "multi_thread", worker_threads = 2),
        replayed_creates_check_participation,
        live_subscriptions_per_caller_are_limited,
        delete_file_tombstones_every_copy,
        history_pages_are_stable_while_messages_arrive,
        read_state_and_conversation_list,
        subscribe_replays_then_follows_without_gaps(flavor = "multi_thread", worker_threads = 2),
        removal_ends_the_live_stream,
        deleted_messages_are_tombstones,
        slow_consumers_are_cut_off_and_resume(flavor = "multi_thread", worker_threads = 2),
        truncated_history_is_out_of_range,
    ]
}
