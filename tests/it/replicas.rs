//! Several replicas sharing one Redis: fan-out across replicas, one sequence for everyone,
//! idempotent retries on any replica, and live streams that survive a Redis restart.

use std::{collections::BTreeSet, time::Duration};

use crate::support::{
    PrivateRedis, TestServer, as_user, create_conversation, text_request, unique_prefix,
    use_test_redis,
};
use futures::StreamExt;
use svc_messaging::grpc::pb;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

type Client = pb::messaging_service_client::MessagingServiceClient<Channel>;

async fn replica(prefix: &str) -> TestServer {
    let prefix = prefix.to_owned();
    TestServer::start_with(move |settings| use_test_redis(settings, &prefix)).await
}

fn subscribe_request(
    user: &str,
    id: &str,
    after: u64,
) -> tonic::Request<pb::SubscribeMessagesRequest> {
    as_user(
        user,
        pb::SubscribeMessagesRequest {
            conversation_id: id.to_owned(),
            after_sequence: after,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_replica_sees_everything_sent_through_the_other() {
    let prefix = unique_prefix("fanout");
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    let mut via_a = Client::new(a.channel().await);
    let mut via_b = Client::new(b.channel().await);
    let id = create_conversation(&mut via_a, "alice", &["bob"]).await;
    let mut stream = via_b
        .subscribe_messages(subscribe_request("bob", &id, 0))
        .await
        .unwrap()
        .into_inner();
    for n in 1..=50 {
        via_a
            .send_message(as_user(
                "alice",
                text_request(&id, &format!("m{n}"), &format!("hello {n}")),
            ))
            .await
            .unwrap();
    }
    for expected in 1..=50u64 {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event within 5s")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        assert_eq!(event.sequence, expected);
    }
    // A retry through the other replica returns the original message.
    let original = via_a
        .send_message(as_user("alice", text_request(&id, "m7", "hello 7")))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    let retried = via_b
        .send_message(as_user("alice", text_request(&id, "m7", "hello 7")))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(original.message_id, retried.message_id);
    assert_eq!(retried.sequence, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_senders_across_two_replicas_share_one_gap_free_sequence() {
    let prefix = unique_prefix("senders");
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    let channels = [a.channel().await, b.channel().await];
    let senders: Vec<String> = (0..20).map(|n| format!("sender{n}")).collect();
    let others: Vec<&str> = senders.iter().map(String::as_str).collect();
    let id = create_conversation(&mut Client::new(channels[0].clone()), "owner", &others).await;
    let mut tasks = Vec::new();
    for (n, sender) in senders.into_iter().enumerate() {
        let mut client = Client::new(channels[n % 2].clone());
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for k in 0..5 {
                let message = client
                    .send_message(as_user(
                        &sender,
                        text_request(&id, &format!("{sender}-{k}"), "hi"),
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .message
                    .unwrap();
                sequences.push(message.sequence);
            }
            sequences
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_event() {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let server = TestServer::start_with(move |settings| {
        use_test_redis(settings, "restart");
        settings.redis.url = Some(secrecy::SecretString::from(url));
    })
    .await;
    let channel = server.channel().await;
    let mut client = Client::new(channel.clone());
    let id = create_conversation(&mut client, "alice", &["bob"]).await;
    for n in 1..=5 {
        client
            .send_message(as_user(
                "alice",
                text_request(&id, &format!("before-{n}"), "before"),
            ))
            .await
            .unwrap();
    }
    let mut stream = client
        .subscribe_messages(subscribe_request("bob", &id, 0))
        .await
        .unwrap()
        .into_inner();
    let mut received = BTreeSet::new();
    while received.len() < 5 {
        let event = stream.next().await.unwrap().unwrap().event.unwrap();
        received.insert(event.sequence);
    }

    redis.stop();
    // While Redis is down: writes fail as retryable and health says NOT_SERVING.
    let status = client
        .send_message(as_user("alice", text_request(&id, "during", "during")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut health = HealthClient::new(channel.clone());
    let mut saw_not_serving = false;
    for _ in 0..200 {
        let status = health
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_not_serving,
        "health turns NOT_SERVING while Redis is down"
    );

    redis.restart();
    // Writes succeed again once the client has reconnected.
    let mut sent_after = 0;
    for attempt in 0..100 {
        match client
            .send_message(as_user(
                "alice",
                text_request(&id, &format!("after-{sent_after}"), "after"),
            ))
            .await
        {
            Ok(_) => {
                sent_after += 1;
                if sent_after == 5 {
                    break;
                }
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Unavailable,
                    "attempt {attempt}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(sent_after, 5, "writes recover after the restart");
    // A write that timed out during the outage may still have been applied: count from the
    // store, not from what the test sent.
    let last_sequence = client
        .get_conversation(as_user(
            "alice",
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
    assert!(last_sequence >= 10);

    // The open stream either carries on or ends with UNAVAILABLE; resubscribing from the last
    // sequence it delivered then fills in the rest. Nothing is missed either way.
    let mut last_delivered = 5;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(response))) => {
                let sequence = response.event.unwrap().sequence;
                assert_eq!(sequence, last_delivered + 1, "no gap in the open stream");
                last_delivered = sequence;
                received.insert(sequence);
                if sequence == last_sequence {
                    break;
                }
            }
            Ok(Some(Err(status))) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                let mut resumed = client
                    .subscribe_messages(subscribe_request("bob", &id, last_delivered))
                    .await
                    .unwrap()
                    .into_inner();
                while last_delivered < last_sequence {
                    let sequence = resumed
                        .next()
                        .await
                        .unwrap()
                        .unwrap()
                        .event
                        .unwrap()
                        .sequence;
                    assert_eq!(sequence, last_delivered + 1);
                    last_delivered = sequence;
                    received.insert(sequence);
                }
                break;
            }
            other => panic!("the stream neither continued nor ended cleanly: {other:?}"),
        }
    }
    assert_eq!(received, (1..=last_sequence).collect::<BTreeSet<u64>>());
}
