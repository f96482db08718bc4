//! Send-to-delivery latency across replicas: two in-process services (A and B) share one Redis
//! under one key prefix; a sender calls SendMessage on A at a paced rate and subscribers on B
//! (SubscribeMessages, one stream per conversation) record when each message arrives.
//!
//! Each message's text carries its index and its send time (nanoseconds since an `Instant`
//! shared by sender and subscribers, all in this process), taken just before the RPC starts,
//! so the latency is RPC + script + PUBLISH + B's feed + B's stream + the client.
//!
//! With `SVC_BENCH_BESIDE=1` (issue 14) the send benchmark runs beside each timed round: a third
//! replica C on a runtime of its own (its own 2 threads, as another process would be) serves 32
//! client tasks sending as fast as they can into 4 other conversations on the same Redis.
//!
//! Knobs: SVC_BENCH_ROUNDS (3), SVC_BENCH_SECONDS (10), SVC_BENCH_RATE (5000 messages/s),
//! SVC_BENCH_BESIDE (0).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, as_user, create_conversation, median, percentile, print_table};
use svc_messaging::grpc::pb::{
    SendMessageRequest, SubscribeMessagesRequest, conversation_event::Event,
    messaging_service_client::MessagingServiceClient, send_message_request::Content,
};
use tokio::sync::watch;
use tonic::transport::Channel;

const SENDER: &str = "alice";
const SUBSCRIBER: &str = "bob";
const CONVERSATIONS: usize = 4;
/// Client channels the sender spreads each burst over.
const SENDER_CHANNELS: usize = 4;
const TICK: Duration = Duration::from_millis(10);
/// Longest wait for the last deliveries after the sending stops.
const DRAIN: Duration = Duration::from_secs(10);
const GOAL_P99_MS: f64 = 5.0;

#[tokio::main]
async fn main() {
    if !common::invoked_by_cargo_bench("fanout_latency") {
        return;
    }
    let rounds: usize = common::knob("SVC_BENCH_ROUNDS", 3);
    let seconds: f64 = common::knob("SVC_BENCH_SECONDS", 10.0);
    let rate: u64 = common::knob("SVC_BENCH_RATE", 5000);
    let burst = (rate as f64 * TICK.as_secs_f64()).round() as usize;
    let ticks = (seconds / TICK.as_secs_f64()).round() as usize;

    let prefix = common::unique_prefix("fanout");
    let replica_a = Server::start(&prefix, |_| {}).await;
    let replica_b = Server::start(&prefix, |_| {}).await;
    let mut senders = Vec::new();
    for _ in 0..SENDER_CHANNELS {
        senders.push(replica_a.channel().await);
    }
    let subscriber_channel = replica_b.channel().await;
    let beside = (common::knob("SVC_BENCH_BESIDE", 0u32) != 0).then(|| SendLoad::start(&prefix));
    println!(
        "fanout_latency: replica A <- SendMessage ({burst} messages every {} ms = {rate}/s over \
         {SENDER_CHANNELS} channels, {CONVERSATIONS} conversations) ; replica B -> \
         SubscribeMessages (one stream per conversation); {seconds} s per round, {rounds} rounds",
        TICK.as_millis()
    );

    // Warm-up round (not reported): connections, scripts, allocator.
    let _ = run_round(&senders, &subscriber_channel, burst, 100).await;

    let cpu_start = common::CpuSample::now();
    let load_start = common::loadavg();
    let mut results = Vec::new();
    for round in 1..=rounds {
        if let Some(beside) = &beside {
            beside.set_running(true);
        }
        let result = run_round(&senders, &subscriber_channel, burst, ticks).await;
        if let Some(beside) = &beside {
            let rate = beside.set_running(false);
            println!("round {round}: send load beside it: {rate:.0} msgs/s");
        }
        println!(
            "round {round}: sent {} (errors {}), received {} (missing {}, duplicates {}), \
             issued at {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            result.sent,
            result.send_errors,
            result.received,
            result.missing,
            result.duplicates,
            result.issue_rate,
            ms(percentile(&result.latencies, 50.0)),
            ms(percentile(&result.latencies, 99.0)),
            ms(result.latencies.last().copied().unwrap_or(0)),
        );
        results.push(result);
    }
    let cpu = common::CpuSample::now().since(&cpu_start);

    let mut rows = Vec::new();
    for (i, result) in results.iter().enumerate() {
        rows.push(row(&(i + 1).to_string(), result));
    }
    let p99s: Vec<f64> = results
        .iter()
        .map(|result| ms(percentile(&result.latencies, 99.0)))
        .collect();
    let mut all: Vec<u64> = results
        .iter()
        .flat_map(|result| result.latencies.iter().copied())
        .collect();
    all.sort_unstable();
    let pooled = RoundResult {
        sent: results.iter().map(|r| r.sent).sum(),
        send_errors: results.iter().map(|r| r.send_errors).sum(),
        received: results.iter().map(|r| r.received).sum(),
        missing: results.iter().map(|r| r.missing).sum(),
        duplicates: results.iter().map(|r| r.duplicates).sum(),
        issue_rate: median(&results.iter().map(|r| r.issue_rate).collect::<Vec<_>>()),
        complete_rate: median(&results.iter().map(|r| r.complete_rate).collect::<Vec<_>>()),
        latencies: all,
        rpc_latencies: {
            let mut rpc: Vec<u64> = results
                .iter()
                .flat_map(|r| r.rpc_latencies.iter().copied())
                .collect();
            rpc.sort_unstable();
            rpc
        },
    };
    rows.push(row("all (pooled)", &pooled));
    let median_p99 = median(&p99s);
    let all_delivered = pooled.missing == 0 && pooled.send_errors == 0 && pooled.duplicates == 0;

    println!();
    println!("---- summary: fanout_latency ----");
    print_table(
        &[
            "round",
            "sent",
            "received",
            "issued/s",
            "completed/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "send RPC p50/p99 ms",
        ],
        &rows,
    );
    println!();
    println!(
        "p99 per round: {}; median {median_p99:.2} ms (spread {:.0}%)",
        p99s.iter()
            .map(|p| format!("{p:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        common::spread_percent(&p99s)
    );
    println!(
        "all messages delivered exactly once: {}",
        if all_delivered { "yes" } else { "NO" }
    );
    println!(
        "goal p99 < {GOAL_P99_MS} ms (median of rounds): {}",
        if median_p99 < GOAL_P99_MS && all_delivered {
            "MET"
        } else {
            "NOT MET"
        }
    );
    println!(
        "machine during the rounds: {cpu}; loadavg before {load_start}, after {}",
        common::loadavg()
    );
    if let Some(beside) = beside {
        println!(
            "send benchmark beside it (replica C, 32 clients, own runtime): {}",
            beside.summary()
        );
    }
    println!("---- end ----");
    replica_a.stop().await;
    replica_b.stop().await;
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

fn row(label: &str, result: &RoundResult) -> Vec<String> {
    let lat = &result.latencies;
    vec![
        label.to_owned(),
        result.sent.to_string(),
        result.received.to_string(),
        format!("{:.0}", result.issue_rate),
        format!("{:.0}", result.complete_rate),
        format!("{:.2}", ms(percentile(lat, 50.0))),
        format!("{:.2}", ms(percentile(lat, 90.0))),
        format!("{:.2}", ms(percentile(lat, 99.0))),
        format!("{:.2}", ms(lat.last().copied().unwrap_or(0))),
        format!(
            "{:.2} / {:.2}",
            ms(percentile(&result.rpc_latencies, 50.0)),
            ms(percentile(&result.rpc_latencies, 99.0))
        ),
    ]
}

struct RoundResult {
    sent: u64,
    send_errors: u64,
    received: u64,
    missing: u64,
    duplicates: u64,
    /// Messages per second at which sends were started (the pacing actually achieved).
    issue_rate: f64,
    /// Sends per second from the first start to the last response.
    complete_rate: f64,
    /// Send-to-delivery latencies (ns), sorted.
    latencies: Vec<u64>,
    /// SendMessage round trips (ns), sorted.
    rpc_latencies: Vec<u64>,
}

/// One round on fresh conversations: subscribe on B, then `ticks` bursts of `burst` sends on A.
async fn run_round(
    senders: &[Channel],
    subscriber_channel: &Channel,
    burst: usize,
    ticks: usize,
) -> RoundResult {
    let mut conversations = Vec::new();
    for _ in 0..CONVERSATIONS {
        conversations.push(create_conversation(&senders[0], SENDER, &[SUBSCRIBER]).await);
    }
    let origin = Instant::now();
    let total = (burst * ticks) as u64;
    let received = Arc::new(AtomicU64::new(0));
    let warmed = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);

    // Subscribers on replica B.
    let mut subscribers = Vec::new();
    for conversation_id in &conversations {
        let mut client = MessagingServiceClient::new(subscriber_channel.clone());
        let mut stream = client
            .subscribe_messages(as_user(
                SUBSCRIBER,
                SubscribeMessagesRequest {
                    conversation_id: conversation_id.clone(),
                    after_sequence: 0,
                },
            ))
            .await
            .expect("subscribe on replica B")
            .into_inner();
        let (received, warmed, mut stopped) = (received.clone(), warmed.clone(), stopped.clone());
        subscribers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let next = tokio::select! {
                    next = stream.message() => next,
                    _ = stopped.wait_for(|stop| *stop) => break,
                };
                let arrived = origin.elapsed().as_nanos() as u64;
                let Some(response) = next.expect("subscription stream failed") else {
                    panic!("the subscription ended early");
                };
                let Some(Event::MessageCreated(created)) =
                    response.event.and_then(|event| event.event)
                else {
                    continue;
                };
                let text = created
                    .message
                    .map(|message| message.text)
                    .unwrap_or_default();
                if text == "warm-up" {
                    warmed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut fields = text.split(' ');
                let index: u64 = fields.next().and_then(|f| f.parse().ok()).expect("index");
                let sent: u64 = fields.next().and_then(|f| f.parse().ok()).expect("time");
                seen.push((index, arrived.saturating_sub(sent)));
                received.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }

    // Every stream is live once it has seen a message sent after it was opened.
    let mut client = MessagingServiceClient::new(senders[0].clone());
    for (n, conversation_id) in conversations.iter().enumerate() {
        client
            .send_message(as_user(
                SENDER,
                SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: format!("warm-up-{n}"),
                    content: Some(Content::Text("warm-up".to_owned())),
                },
            ))
            .await
            .expect("warm-up send");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while warmed.load(Ordering::Relaxed) < CONVERSATIONS as u64 {
        assert!(
            Instant::now() < deadline,
            "subscriptions on B never went live"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Paced sender on replica A: a burst every tick, each message its own task.
    let send_errors = Arc::new(AtomicU64::new(0));
    let mut interval = tokio::time::interval(TICK);
    let mut in_flight = Vec::with_capacity(total as usize);
    let mut first_issue = None;
    let mut last_issue = origin;
    for tick in 0..ticks {
        interval.tick().await;
        let now = Instant::now();
        first_issue.get_or_insert(now);
        last_issue = now;
        for j in 0..burst {
            let index = tick * burst + j;
            let mut client = MessagingServiceClient::new(senders[index % senders.len()].clone());
            let conversation_id = conversations[index % conversations.len()].clone();
            let send_errors = send_errors.clone();
            in_flight.push(tokio::spawn(async move {
                let sent = origin.elapsed().as_nanos() as u64;
                let request = SendMessageRequest {
                    conversation_id,
                    client_message_id: format!("m-{index}"),
                    content: Some(Content::Text(format!("{index} {sent}"))),
                };
                if let Err(status) = client.send_message(as_user(SENDER, request)).await
                    && send_errors.fetch_add(1, Ordering::Relaxed) == 0
                {
                    eprintln!("SendMessage failed: {status}");
                }
                origin.elapsed().as_nanos() as u64 - sent
            }));
        }
    }
    let first_issue = first_issue.unwrap_or(origin);
    let mut rpc_latencies = Vec::with_capacity(in_flight.len());
    for task in in_flight {
        rpc_latencies.push(task.await.unwrap());
    }
    let completed = first_issue.elapsed().as_secs_f64();
    let send_errors = send_errors.load(Ordering::Relaxed);
    let sent = total - send_errors;

    let deadline = Instant::now() + DRAIN;
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(true);
    let mut seen = Vec::new();
    for subscriber in subscribers {
        seen.extend(subscriber.await.unwrap());
    }
    let mut delivered = vec![false; total as usize];
    let mut duplicates = 0;
    let mut latencies = Vec::with_capacity(seen.len());
    for (index, latency) in seen {
        let slot = &mut delivered[index as usize];
        if *slot {
            duplicates += 1;
        }
        *slot = true;
        latencies.push(latency);
    }
    latencies.sort_unstable();
    rpc_latencies.sort_unstable();
    let issue_window = last_issue.duration_since(first_issue).as_secs_f64() + TICK.as_secs_f64();
    RoundResult {
        sent,
        send_errors,
        received: latencies.len() as u64,
        missing: delivered.iter().filter(|delivered| !**delivered).count() as u64,
        duplicates,
        issue_rate: total as f64 / issue_window,
        complete_rate: total as f64 / completed,
        latencies,
        rpc_latencies,
    }
}

/// The send benchmark beside the rounds: replica C and its clients on a runtime of their own.
struct SendLoad {
    running: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<AtomicU64>,
    since: std::sync::Mutex<(Instant, u64)>,
    rates: std::sync::Mutex<Vec<f64>>,
}

impl SendLoad {
    /// Starts replica C (same Redis and key prefix) on 2 threads of its own; its clients send
    /// while `running` is set.
    fn start(prefix: &str) -> Self {
        let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (prefix, flag, counter) = (prefix.to_owned(), running.clone(), sent.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime for replica C");
            runtime.block_on(async move {
                let replica_c = Server::start(&prefix, |_| {}).await;
                let mut channels = Vec::new();
                for _ in 0..4 {
                    channels.push(replica_c.channel().await);
                }
                let mut conversations = Vec::new();
                for _ in 0..CONVERSATIONS {
                    conversations.push(create_conversation(&channels[0], "carol", &["dave"]).await);
                }
                let _ = ready_tx.send(());
                let mut tasks = Vec::new();
                for task in 0..32 {
                    let mut client = MessagingServiceClient::new(channels[task % 4].clone());
                    let conversation_id = conversations[task % CONVERSATIONS].clone();
                    let (flag, counter) = (flag.clone(), counter.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        loop {
                            if !flag.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            n += 1;
                            let request = SendMessageRequest {
                                conversation_id: conversation_id.clone(),
                                client_message_id: format!("beside-{task}-{n}"),
                                content: Some(Content::Text(format!("hello from beside, #{n}"))),
                            };
                            if client.send_message(as_user("carol", request)).await.is_ok() {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
        });
        ready_rx.recv().expect("replica C started");
        Self {
            running,
            sent,
            since: std::sync::Mutex::new((Instant::now(), 0)),
            rates: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts or stops the load; on stop, returns its rate since the start.
    fn set_running(&self, on: bool) -> f64 {
        let mut since = self.since.lock().unwrap();
        let now = (Instant::now(), self.sent.load(Ordering::Relaxed));
        self.running.store(on, Ordering::Relaxed);
        let rate = (now.1 - since.1) as f64 / now.0.duration_since(since.0).as_secs_f64();
        *since = now;
        if !on {
            self.rates.lock().unwrap().push(rate);
        }
        rate
    }

    fn summary(&self) -> String {
        let rates = self.rates.lock().unwrap();
        format!(
            "{} msgs/s per round, median {:.0}",
            rates
                .iter()
                .map(|rate| format!("{rate:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            median(&rates)
        )
    }
}
