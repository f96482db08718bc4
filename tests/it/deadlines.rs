//! The caller's deadline (`grpc-timeout`) against the real service on Redis: a call still busy
//! when it runs out is answered `DEADLINE_EXCEEDED` with reason `DEADLINE_EXCEEDED`, never
//! tonic's own `CANCELLED "Timeout expired"`, for a unary call and for streams.
//!
//! These calls go through a plain HTTP/2 client. tonic's `Channel` enforces the deadline on the
//! client side as well and would report its own error before the server's status arrives; a
//! caller sees the server's answer whenever that arrives first (a client that leaves deadlines
//! to the server, a proxy in between), and that answer is what is tested here.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use futures::StreamExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use svc_messaging::grpc::pb::{
    self, file_relay_service_client::FileRelayServiceClient,
    messaging_service_client::MessagingServiceClient, upload_file_request::Payload,
};
use tonic::Code;

use crate::support::{
    PrivateRedis, TestServer, as_user, create_conversation, history, reason, required_tool,
    text_request, unique_prefix, use_test_redis,
};

type PlainHttp2 = Client<HttpConnector, tonic::body::Body>;

/// A client that sends `grpc-timeout` but leaves enforcing it to the server.
fn plain_http2(server: &TestServer) -> (PlainHttp2, http::Uri) {
    let client = Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{}", server.grpc_addr).parse().unwrap();
    (client, origin)
}

fn with_deadline<T>(user: &str, message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = as_user(user, message);
    request.set_timeout(deadline);
    request
}

fn assert_deadline_exceeded(status: &tonic::Status) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(status), "DEADLINE_EXCEEDED", "{status:?}");
}

fn redis_cli(redis: &PrivateRedis, args: &[&str]) {
    let output = Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", &redis.password)
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "OK",
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A send stuck on a paused Redis is answered DEADLINE_EXCEEDED when its deadline runs out, and
/// a retry with the same `client_message_id` once Redis is back leaves exactly one message with
/// it, whether or not the first attempt was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stuck_on_redis_gets_deadline_exceeded() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let server = TestServer::start_with(move |settings| {
        use_test_redis(settings, &unique_prefix("deadline-send"));
        settings.redis.url = Some(secrecy::SecretString::from(url));
    })
    .await;
    let mut messaging = MessagingServiceClient::new(server.channel().await);
    let id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let (client, origin) = plain_http2(&server);
    let mut plain = MessagingServiceClient::with_origin(client, origin);

    // Writes (the send script) wait; reads and CLIENT UNPAUSE still run.
    redis_cli(&redis, &["client", "pause", "20000", "write"]);
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let status = plain
        .send_message(with_deadline(
            "alice",
            text_request(&id, "m-1", "hello"),
            deadline,
        ))
        .await
        .expect_err("Redis is paused");
    let waited = started.elapsed();
    // tonic's own timer runs out at the same instant: however short the deadline, the answer
    // is still DEADLINE_EXCEEDED.
    let racing = (1..=40u64).map(|millis| {
        let mut plain = plain.clone();
        let request = text_request(&id, &format!("race-{millis}"), "hello");
        async move {
            plain
                .send_message(with_deadline(
                    "alice",
                    request,
                    Duration::from_millis(millis),
                ))
                .await
        }
    });
    let raced = futures::future::join_all(racing).await;
    redis_cli(&redis, &["client", "unpause"]);
    assert_deadline_exceeded(&status);
    assert!(waited >= deadline, "answered after {waited:?}");
    for result in raced {
        assert_deadline_exceeded(&result.expect_err("Redis is paused"));
    }

    messaging
        .send_message(as_user("alice", text_request(&id, "m-1", "hello")))
        .await
        .expect("the retry succeeds");
    let stored = history(&mut messaging, "alice", &id).await;
    let sent = stored
        .iter()
        .filter(|message| message.client_message_id == "m-1")
        .count();
    assert_eq!(sent, 1, "{stored:?}");
}

/// An upload whose client stalls after the metadata is still waiting for bytes when its deadline
/// runs out: DEADLINE_EXCEEDED, not CANCELLED.
#[tokio::test]
async fn an_upload_past_its_deadline_gets_deadline_exceeded() {
    let server = TestServer::start_with(|settings| {
        use_test_redis(settings, &unique_prefix("deadline-upload"));
    })
    .await;
    let mut messaging = MessagingServiceClient::new(server.channel().await);
    let id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let (client, origin) = plain_http2(&server);
    let mut files = FileRelayServiceClient::with_origin(client, origin);

    let metadata = pb::UploadFileRequest {
        payload: Some(Payload::Metadata(pb::UploadMetadata {
            conversation_id: id,
            file_name: "notes.txt".to_owned(),
            content_type: "text/plain".to_owned(),
            size_bytes: 6,
            ..Default::default()
        })),
    };
    let stalled = futures::stream::iter([metadata]).chain(futures::stream::pending());
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        files.upload_file(with_deadline("alice", stalled, Duration::from_millis(300))),
    )
    .await
    .expect("the server answers at the deadline")
    .expect_err("no bytes were sent");
    assert_deadline_exceeded(&status);
}

/// A live subscription delivers until its deadline, then ends with DEADLINE_EXCEEDED (tonic
/// itself would let it run on), and its per-caller slot is free again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_at_its_deadline() {
    let server = TestServer::start_with(|settings| {
        use_test_redis(settings, &unique_prefix("deadline-subscribe"));
        settings.messaging.max_subscriptions_per_caller = 1;
    })
    .await;
    let mut messaging = MessagingServiceClient::new(server.channel().await);
    let id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let (client, origin) = plain_http2(&server);
    let mut plain = MessagingServiceClient::with_origin(client, origin);

    let deadline = Duration::from_secs(2);
    let started = Instant::now();
    let subscription = pb::SubscribeMessagesRequest {
        conversation_id: id.clone(),
        after_sequence: 0,
    };
    let mut stream = plain
        .subscribe_messages(with_deadline("bob", subscription.clone(), deadline))
        .await
        .expect("subscribed")
        .into_inner();
    messaging
        .send_message(as_user("alice", text_request(&id, "m-1", "hello")))
        .await
        .unwrap();
    let delivered = stream.next().await.expect("an event").expect("delivered");
    assert_eq!(delivered.event.expect("an event").sequence, 1);

    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream outlived its deadline");
    let status = end
        .expect("a final status")
        .expect_err("ended by the deadline");
    assert_deadline_exceeded(&status);
    assert!(
        started.elapsed() >= deadline,
        "ended after {:?}",
        started.elapsed()
    );

    messaging
        .subscribe_messages(as_user("bob", subscription))
        .await
        .expect("the slot of the ended subscription is free");
}
