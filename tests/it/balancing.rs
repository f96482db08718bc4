//! Balanced gRPC: a connection past `server.max_connection_age` is sent GOAWAY, its calls get
//! `server.max_connection_age_grace` and then end with `UNAVAILABLE` / `CONNECTION_MAX_AGE`, so
//! a client pinned to one replica by a per-connection balancer (a ClusterIP Service) moves on,
//! and an idle connection cannot hold a `server.max_connections` slot forever.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use svc_messaging::grpc::pb;
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::{
    TestServer, as_user, create_conversation, reason, text_request, unique_prefix, use_test_redis,
};

type Client = pb::messaging_service_client::MessagingServiceClient<Channel>;

const AGE: Duration = Duration::from_millis(1500);
const GRACE: Duration = Duration::from_millis(1000);

async fn replica(prefix: &str) -> TestServer {
    let prefix = prefix.to_owned();
    TestServer::start_with(move |settings| {
        use_test_redis(settings, &prefix);
        settings.server.max_connection_age = AGE;
        settings.server.max_connection_age_grace = GRACE;
    })
    .await
}

/// A per-connection round-robin TCP balancer, as kube-proxy does for a ClusterIP Service:
/// connection n goes to backend n mod len, and every byte of it stays there.
struct ConnectionBalancer {
    addr: SocketAddr,
    /// The backend index of each connection, in accept order.
    picks: Arc<Mutex<Vec<usize>>>,
}

impl ConnectionBalancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let picks = Arc::new(Mutex::new(Vec::new()));
        let recorded = picks.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let pick = {
                    let mut picks = recorded.lock().unwrap();
                    let pick = picks.len() % backends.len();
                    picks.push(pick);
                    pick
                };
                let backend = backends[pick];
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Self { addr, picks }
    }

    fn picks(&self) -> Vec<usize> {
        self.picks.lock().unwrap().clone()
    }
}

/// `grpc_server_handled_total` of `method` on `server`, over every status code.
async fn handled(server: &TestServer, method: &str) -> f64 {
    let text = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let needle = format!("grpc_method=\"{method}\"");
    text.lines()
        .filter(|line| line.starts_with("grpc_server_handled_total{") && line.contains(&needle))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `text` as `client_id`, retrying with the same id (idempotent) the way a client does when
/// its connection goes away under a call: `UNAVAILABLE`, or the `CANCELLED` a tonic client
/// reports for a call it started on a connection the server had just sent GOAWAY (these tests
/// set no timeouts, so that is the only way to get `CANCELLED` here), or the `INTERNAL` "h2
/// protocol error" carrying that GOAWAY (`NO_ERROR`) that it reports when the frame arrives
/// while the call is being opened: the server never saw such a call.
async fn send_until_stored(client: &mut Client, id: &str, client_id: &str, text: &str) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .send_message(as_user("alice", text_request(id, client_id, text)))
            .await
        {
            Ok(response) => return response.into_inner().message.unwrap().sequence,
            Err(status)
                if (matches!(status.code(), Code::Unavailable | Code::Cancelled)
                    || refused_by_goaway(&status))
                    && Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("send {client_id}: {status:?}"),
        }
    }
}

/// The `INTERNAL` a tonic client reports for a call its connection's graceful GOAWAY refused.
fn refused_by_goaway(status: &tonic::Status) -> bool {
    status.code() == Code::Internal && format!("{status:?}").contains("GoAway(b\"\", NO_ERROR")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_moves_to_the_other_replica_after_the_age_without_losing_an_event() {
    let prefix = unique_prefix("balance");
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    let balancer = ConnectionBalancer::start(vec![a.grpc_addr, b.grpc_addr]).await;
    // One channel, one connection: every call of this client goes where that connection went.
    // Timed from before the connect, so the server's accept (where the age starts) is later.
    let connected = Instant::now();
    let channel = Channel::from_shared(format!("http://{}", balancer.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = Client::new(channel.clone());
    let id = create_conversation(&mut client, "alice", &["bob"]).await;

    // bob reads live, resubscribing after his last sequence whenever his stream ends.
    let subscriber = {
        let mut client = Client::new(channel.clone());
        let id = id.clone();
        tokio::spawn(async move {
            let mut received: Vec<(u64, String)> = Vec::new();
            let mut endings: Vec<(Code, String, Duration)> = Vec::new();
            let done = Instant::now() + Duration::from_secs(20);
            while Instant::now() < done {
                let after = received.last().map_or(0, |(sequence, _)| *sequence);
                let request = as_user(
                    "bob",
                    pb::SubscribeMessagesRequest {
                        conversation_id: id.clone(),
                        after_sequence: after,
                    },
                );
                let mut stream = match client.subscribe_messages(request).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => {
                        assert!(
                            matches!(status.code(), Code::Unavailable | Code::Cancelled),
                            "{status:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                loop {
                    match stream.next().await {
                        Some(Ok(response)) => {
                            let event = response.event.unwrap();
                            let Some(pb::conversation_event::Event::MessageCreated(created)) =
                                event.event
                            else {
                                continue;
                            };
                            let message = created.message.unwrap();
                            received.push((event.sequence, message.text));
                            if message.client_message_id == "last" {
                                return (received, endings);
                            }
                        }
                        Some(Err(status)) => {
                            endings.push((status.code(), reason(&status), connected.elapsed()));
                            break;
                        }
                        None => {
                            endings.push((Code::Ok, String::new(), connected.elapsed()));
                            break;
                        }
                    }
                }
            }
            panic!("the last message never arrived; got {received:?}, endings {endings:?}");
        })
    };

    // alice keeps sending through the same channel, past two ages.
    let mut sent = Vec::new();
    let sending_until = connected + 2 * (AGE + GRACE) + Duration::from_millis(500);
    let mut n = 0;
    while Instant::now() < sending_until {
        n += 1;
        let text = format!("hello {n}");
        let sequence = send_until_stored(&mut client, &id, &format!("m{n}"), &text).await;
        sent.push((sequence, text));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let sequence = send_until_stored(&mut client, &id, "last", "bye").await;
    sent.push((sequence, "bye".to_owned()));

    let (received, endings) = tokio::time::timeout(Duration::from_secs(20), subscriber)
        .await
        .expect("the subscriber finishes")
        .unwrap();
    // Every event exactly once, in order, across the resubscriptions.
    assert_eq!(received, sent);
    // The stream was ended by the age, not before its grace...
    let (code, why, at) = endings.first().cloned().expect("the age ended the stream");
    assert_eq!(
        (code, why.as_str()),
        (Code::Unavailable, "CONNECTION_MAX_AGE")
    );
    assert!(at >= AGE + GRACE, "ended after {at:?}, before age + grace");
    // ...and the client's reconnections went through the balancer to both replicas, which
    // both served its calls.
    let picks: BTreeSet<usize> = balancer.picks().into_iter().collect();
    assert_eq!(
        picks,
        BTreeSet::from([0, 1]),
        "connections: {:?}",
        balancer.picks()
    );
    let served = [
        handled(&a, "SendMessage").await,
        handled(&b, "SendMessage").await,
    ];
    assert!(
        served.iter().all(|calls| *calls > 0.0),
        "SendMessage calls per replica: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_balancing_over_both_replicas_resubscribes_without_losing_an_event() {
    let prefix = unique_prefix("balance-list");
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    // What a client does with the headless Service: one endpoint per pod, balanced per call.
    let endpoints = [a.grpc_addr, b.grpc_addr]
        .map(|addr| tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap());
    let channel = Channel::balance_list(endpoints.into_iter());
    let mut client = Client::new(channel.clone());
    let id = loop {
        // The balancer connects in the background; the first calls may find no endpoint ready.
        let request = as_user(
            "alice",
            pb::CreateConversationRequest {
                title: "balanced".to_owned(),
                participant_ids: vec!["bob".to_owned()],
                request_id: format!("create-{prefix}"),
            },
        );
        match client.create_conversation(request).await {
            Ok(response) => break response.into_inner().conversation.unwrap().conversation_id,
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let started = Instant::now();
    let mut stream_client = client.clone();
    let mut received = Vec::new();
    let mut endings = Vec::new();
    let mut sent = Vec::new();
    let mut n = 0;
    while started.elapsed() < AGE + GRACE + Duration::from_secs(1) || endings.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no stream ended by age"
        );
        let after = received.last().map_or(0, |(sequence, _)| *sequence);
        let mut stream = match stream_client
            .subscribe_messages(as_user(
                "bob",
                pb::SubscribeMessagesRequest {
                    conversation_id: id.clone(),
                    after_sequence: after,
                },
            ))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if matches!(status.code(), Code::Unavailable | Code::Cancelled) => {
                continue;
            }
            Err(status) => panic!("{status:?}"),
        };
        // Send a few, read them back; until the stream ends.
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the stream was not ended by the connection's age"
            );
            n += 1;
            let text = format!("hello {n}");
            let sequence = send_until_stored(&mut client, &id, &format!("m{n}"), &text).await;
            sent.push((sequence, text));
            let mut ended = false;
            while received.len() < sent.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.next())
                    .await
                    .expect("an event or the end within 5s")
                {
                    Some(Ok(response)) => {
                        let event = response.event.unwrap();
                        if let Some(pb::conversation_event::Event::MessageCreated(created)) =
                            event.event
                        {
                            received.push((event.sequence, created.message.unwrap().text));
                        }
                    }
                    Some(Err(status)) => {
                        endings.push((status.code(), reason(&status)));
                        ended = true;
                        break;
                    }
                    None => panic!("a live stream ended without a status"),
                }
            }
            if ended {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    // Read what was sent after the last stream ended.
    if received.len() < sent.len() {
        let after = received.last().map_or(0, |(sequence, _)| *sequence);
        let mut stream = stream_client
            .subscribe_messages(as_user(
                "bob",
                pb::SubscribeMessagesRequest {
                    conversation_id: id.clone(),
                    after_sequence: after,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        while received.len() < sent.len() {
            let event = stream.next().await.unwrap().unwrap().event.unwrap();
            if let Some(pb::conversation_event::Event::MessageCreated(created)) = event.event {
                received.push((event.sequence, created.message.unwrap().text));
            }
        }
    }
    assert_eq!(received, sent);
    assert!(
        endings
            .iter()
            .all(|(code, why)| *code == Code::Unavailable && why == "CONNECTION_MAX_AGE"),
        "{endings:?}"
    );
    let served = [
        handled(&a, "SendMessage").await,
        handled(&b, "SendMessage").await,
    ];
    assert!(
        served.iter().all(|calls| *calls > 0.0),
        "SendMessage calls per replica: {served:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_gives_its_slot_back_at_its_age() {
    let server = TestServer::start_with(|settings| {
        settings.server.max_connections = 1;
        settings.server.max_connection_age = Duration::from_millis(500);
        settings.server.max_connection_age_grace = Duration::from_millis(500);
    })
    .await;
    // A client that made one call and then sits idle on its connection (answering pings).
    let idle = server.channel().await;
    HealthClient::new(idle.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let fresh_check = || async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
                .unwrap()
                .connect_lazy();
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
    };
    let refused = fresh_check().await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // The idle connection is sent GOAWAY at its age and, with no call open, closes: the slot
    // is free for the next client.
    let started = Instant::now();
    loop {
        match fresh_check().await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the idle connection still holds the only slot"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    drop(idle);
}
