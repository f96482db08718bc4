//! Many live streams on one replica (issue 14): 10 000 SubscribeMessages streams (1 000
//! conversations x 10 participants, every stream its own caller) on the service binary (a child
//! process, Redis store, default config), over 50 HTTP/2 connections.
//!
//! Measures:
//! - RSS per stream: VmRSS once every stream is live (each has received a warm-up message sent
//!   after it opened) minus VmRSS before the first stream opened, divided by the streams;
//! - delivery under load: a paced sender (every 10 ms, 20 SendMessage calls to random
//!   conversations, each its own task: 2 000 msgs/s, 20 000 deliveries/s) for SVC_BENCH_SECONDS;
//!   latency = arrival at a subscriber - just before the send RPC (one clock, this process);
//!   every stream must receive exactly the messages sent to its conversation, in order.
//!
//! Knobs: SVC_BENCH_SECONDS (10), SVC_BENCH_CONVERSATIONS (1000), SVC_BENCH_RATE (2000).

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{ServiceProcess, as_user, create_conversation, percentile, print_table};
use svc_messaging::grpc::pb::{
    SendMessageRequest, SubscribeMessagesRequest, conversation_event::Event,
    messaging_service_client::MessagingServiceClient, send_message_request::Content,
};
use tokio::sync::watch;
use tonic::transport::Channel;

const PARTICIPANTS: usize = 10;
/// Connections the streams are spread over (the default `server.max_concurrent_streams` is 256).
const CONNECTIONS: usize = 50;
const TICK: Duration = Duration::from_millis(10);
const SENDER_CHANNELS: usize = 4;

fn participant(conversation: usize, index: usize) -> String {
    format!("u{conversation}-{index}")
}

#[tokio::main]
async fn main() {
    if !common::invoked_by_cargo_bench("streams") {
        return;
    }
    let seconds: f64 = common::knob("SVC_BENCH_SECONDS", 10.0);
    let conversation_count: usize = common::knob("SVC_BENCH_CONVERSATIONS", 1000);
    let rate: usize = common::knob("SVC_BENCH_RATE", 2000);
    let streams = conversation_count * PARTICIPANTS;
    println!(
        "streams: {streams} SubscribeMessages streams ({conversation_count} conversations x \
         {PARTICIPANTS}) on one replica over {CONNECTIONS} connections; {rate} msgs/s for {seconds} s"
    );
    let load_start = common::loadavg();
    let cpu_start = common::CpuSample::now();
    let service = ServiceProcess::spawn(&common::unique_prefix("streams"), &[]);

    // Conversations, each created by its first participant.
    let setup = common::connect(service.grpc_addr).await;
    let mut conversations = Vec::with_capacity(conversation_count);
    for conversation in 0..conversation_count {
        let others: Vec<String> = (1..PARTICIPANTS)
            .map(|index| participant(conversation, index))
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        conversations
            .push(create_conversation(&setup, &participant(conversation, 0), &others).await);
    }
    let mut connections = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        connections.push(common::connect(service.grpc_addr).await);
    }
    let senders: Vec<Channel> = connections[..SENDER_CHANNELS].to_vec();
    // Settle what the setup allocated before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = service.status_kib("VmRSS");

    let origin = Instant::now();
    let warmed = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut subscribers = Vec::with_capacity(streams);
    for (conversation, conversation_id) in conversations.iter().enumerate() {
        for index in 0..PARTICIPANTS {
            let stream_number = conversation * PARTICIPANTS + index;
            let mut client =
                MessagingServiceClient::new(connections[stream_number % CONNECTIONS].clone());
            let mut stream = client
                .subscribe_messages(as_user(
                    &participant(conversation, index),
                    SubscribeMessagesRequest {
                        conversation_id: conversation_id.clone(),
                        after_sequence: 0,
                    },
                ))
                .await
                .expect("subscribe")
                .into_inner();
            let (warmed, received, mut stopped) =
                (warmed.clone(), received.clone(), stopped.clone());
            subscribers.push(tokio::spawn(async move {
                // (message index, latency ns, sequence) as they arrived.
                let mut seen: Vec<(u64, u64, u64)> = Vec::new();
                loop {
                    let next = tokio::select! {
                        next = stream.message() => next,
                        _ = stopped.wait_for(|stop| *stop) => break,
                    };
                    let arrived = origin.elapsed().as_nanos() as u64;
                    let Some(response) = next.expect("subscription stream failed") else {
                        panic!("a subscription ended early");
                    };
                    let Some(event) = response.event else {
                        continue;
                    };
                    let sequence = event.sequence;
                    let Some(Event::MessageCreated(created)) = event.event else {
                        continue;
                    };
                    let text = created.message.map(|m| m.text).unwrap_or_default();
                    if text == "warm-up" {
                        warmed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let mut fields = text.split(' ');
                    let index: u64 = fields.next().and_then(|f| f.parse().ok()).expect("index");
                    let sent: u64 = fields.next().and_then(|f| f.parse().ok()).expect("time");
                    seen.push((index, arrived.saturating_sub(sent), sequence));
                    received.fetch_add(1, Ordering::Relaxed);
                }
                (conversation, seen)
            }));
        }
    }

    // Every stream is live once it has seen a message sent after it opened.
    let mut client = MessagingServiceClient::new(senders[0].clone());
    for (conversation, conversation_id) in conversations.iter().enumerate() {
        client
            .send_message(as_user(
                &participant(conversation, 0),
                SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: "warm-up".to_owned(),
                    content: Some(Content::Text("warm-up".to_owned())),
                },
            ))
            .await
            .expect("warm-up send");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while warmed.load(Ordering::Relaxed) < streams as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {streams} streams went live",
            warmed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_live = service.status_kib("VmRSS");
    let service_cpu_start = service.cpu_seconds();

    // The paced sender: `per_tick` sends every tick to pseudo-random conversations.
    let per_tick = (rate as f64 * TICK.as_secs_f64()).round() as usize;
    let ticks = (seconds / TICK.as_secs_f64()).round() as usize;
    let send_errors = Arc::new(AtomicU64::new(0));
    let mut sent_to: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut interval = tokio::time::interval(TICK);
    let mut in_flight = Vec::with_capacity(per_tick * ticks);
    let send_start = Instant::now();
    for tick in 0..ticks {
        interval.tick().await;
        for j in 0..per_tick {
            let index = (tick * per_tick + j) as u64;
            // A fixed pseudo-random walk over the conversations (Knuth's multiplicative hash).
            let conversation =
                (index.wrapping_mul(2_654_435_761) % conversation_count as u64) as usize;
            sent_to.entry(conversation).or_default().push(index);
            let mut client =
                MessagingServiceClient::new(senders[index as usize % senders.len()].clone());
            let conversation_id = conversations[conversation].clone();
            let send_errors = send_errors.clone();
            in_flight.push(tokio::spawn(async move {
                let sent = origin.elapsed().as_nanos() as u64;
                let request = SendMessageRequest {
                    conversation_id,
                    client_message_id: format!("m-{index}"),
                    content: Some(Content::Text(format!("{index} {sent}"))),
                };
                if let Err(status) = client
                    .send_message(as_user(&participant(conversation, 0), request))
                    .await
                    && send_errors.fetch_add(1, Ordering::Relaxed) == 0
                {
                    eprintln!("SendMessage failed: {status}");
                }
            }));
        }
    }
    let issued_seconds = send_start.elapsed().as_secs_f64();
    for task in in_flight {
        task.await.unwrap();
    }
    let sent_total = (per_tick * ticks) as u64;
    let expected = sent_total * PARTICIPANTS as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let service_cpu = service.cpu_seconds() - service_cpu_start;
    let rss_after = service.status_kib("VmRSS");
    let _ = stop.send(true);

    let mut latencies = Vec::with_capacity(expected as usize);
    let (mut missing, mut duplicated, mut out_of_order) = (0u64, 0u64, 0u64);
    for subscriber in subscribers {
        let (conversation, seen) = subscriber.await.unwrap();
        let wanted = sent_to.get(&conversation).cloned().unwrap_or_default();
        let mut got: Vec<u64> = seen.iter().map(|(index, _, _)| *index).collect();
        out_of_order += seen
            .windows(2)
            .filter(|pair| pair[1].2 <= pair[0].2)
            .count() as u64;
        got.sort_unstable();
        let before = got.len();
        got.dedup();
        duplicated += (before - got.len()) as u64;
        missing += wanted
            .iter()
            .filter(|index| got.binary_search(index).is_err())
            .count() as u64;
        latencies.extend(seen.iter().map(|(_, latency, _)| *latency));
    }
    latencies.sort_unstable();
    let ms = |ns: u64| format!("{:.2}", ns as f64 / 1e6);
    let cpu = common::CpuSample::now().since(&cpu_start);

    println!("---- summary: streams ----");
    let per_stream_kib = (rss_live.saturating_sub(rss_before)) as f64 / streams as f64;
    print_table(
        &[
            "streams",
            "VmRSS before (MiB)",
            "VmRSS all live (MiB)",
            "VmRSS after the load (MiB)",
            "per stream (KiB)",
        ],
        &[vec![
            streams.to_string(),
            format!("{:.1}", rss_before as f64 / 1024.0),
            format!("{:.1}", rss_live as f64 / 1024.0),
            format!("{:.1}", rss_after as f64 / 1024.0),
            format!("{per_stream_kib:.1}"),
        ]],
    );
    println!(
        "RSS per live stream {per_stream_kib:.1} KiB; goal <= 16 KiB: {}",
        if per_stream_kib <= 16.0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    println!();
    let p99 = percentile(&latencies, 99.0);
    print_table(
        &[
            "sent",
            "issued/s",
            "deliveries expected",
            "delivered",
            "missing",
            "duplicated",
            "out of order",
            "send errors",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "service CPU s",
        ],
        &[vec![
            sent_total.to_string(),
            format!("{:.0}", sent_total as f64 / issued_seconds),
            expected.to_string(),
            latencies.len().to_string(),
            missing.to_string(),
            duplicated.to_string(),
            out_of_order.to_string(),
            send_errors.load(Ordering::Relaxed).to_string(),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 90.0)),
            ms(p99),
            ms(latencies.last().copied().unwrap_or(0)),
            format!("{service_cpu:.1}"),
        ]],
    );
    let complete = missing == 0 && duplicated == 0 && out_of_order == 0;
    println!(
        "every event delivered once, in order: {}; p99 {} ms, goal < 25 ms: {}",
        if complete { "yes" } else { "NO" },
        ms(p99),
        if complete && p99 < 25_000_000 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    println!(
        "machine during the run: {cpu}; loadavg before {load_start}, after {}",
        common::loadavg()
    );
    println!("---- end ----");
}
