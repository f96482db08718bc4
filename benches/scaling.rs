//! How SendMessage throughput grows with replicas and Redis Cluster shards (issue 14), on this
//! machine: ratios, not capacity. Configurations, interleaved round by round:
//!   single-1   one replica on one Redis (the reference),
//!   cluster-1  one replica on a 3-master Redis Cluster,
//!   cluster-2  two replicas on the same cluster,
//!   cluster-3  three replicas on the same cluster.
//! Each replica is an in-process service (its own Redis clients, its own gRPC listener); 48
//! client tasks send text messages into 48 fresh conversations (spread over the cluster's
//! slots by their random ids), task i through replica i mod N, for SVC_BENCH_SECONDS. Besides
//! msgs/s it reads each Redis node's CPU time (`INFO cpu`) before and after, so the table shows
//! how the shards share the work.
//!
//! Needs SVC_TEST_REDIS_URL, SVC_TEST_REDIS_CLUSTER_URL, SVC_TEST_REDIS_CLUSTER_PORTS and
//! SVC_TEST_REDIS_CLUSTER_PASSWORD (scripts/bench starts both).
//! Knobs: SVC_BENCH_ROUNDS (3), SVC_BENCH_SECONDS (5).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{RedisCli, Server, as_user, create_conversation, median, print_table, spread_percent};
use svc_messaging::grpc::pb::{
    SendMessageRequest, messaging_service_client::MessagingServiceClient,
    send_message_request::Content,
};
use tonic::transport::Channel;

const SENDER: &str = "alice";
const OTHER: &str = "bob";
const CONVERSATIONS: usize = 48;
const CLIENT_TASKS: usize = 48;
/// HTTP/2 connections from the load to each replica.
const CHANNELS_PER_REPLICA: usize = 2;

#[derive(Clone, Copy)]
struct Config {
    name: &'static str,
    replicas: usize,
    cluster: bool,
}

const CONFIGS: [Config; 4] = [
    Config {
        name: "single-1",
        replicas: 1,
        cluster: false,
    },
    Config {
        name: "cluster-1",
        replicas: 1,
        cluster: true,
    },
    Config {
        name: "cluster-2",
        replicas: 2,
        cluster: true,
    },
    Config {
        name: "cluster-3",
        replicas: 3,
        cluster: true,
    },
];

/// The Redis servers a configuration uses.
fn redis_nodes(cluster: bool) -> Vec<RedisCli> {
    if cluster {
        let password = common::required_env("SVC_TEST_REDIS_CLUSTER_PASSWORD");
        common::required_env("SVC_TEST_REDIS_CLUSTER_PORTS")
            .split(',')
            .map(|port| RedisCli::at(port, &password))
            .collect()
    } else {
        vec![RedisCli::from_env()]
    }
}

struct RoundResult {
    rate: f64,
    errors: u64,
    /// Redis CPU milliseconds per 1 000 sends, per node.
    redis_ms_per_k: Vec<f64>,
}

async fn run(config: Config, round: usize, duration: Duration) -> RoundResult {
    let url = common::required_env(if config.cluster {
        "SVC_TEST_REDIS_CLUSTER_URL"
    } else {
        "SVC_TEST_REDIS_URL"
    });
    let prefix = common::unique_prefix("scaling");
    let mut servers = Vec::new();
    for _ in 0..config.replicas {
        let url = url.clone();
        servers.push(
            Server::start(&prefix, move |settings| {
                settings.redis.url = Some(secrecy::SecretString::from(url));
            })
            .await,
        );
    }
    let mut channels: Vec<Vec<Channel>> = Vec::new();
    for server in &servers {
        let mut own = Vec::new();
        for _ in 0..CHANNELS_PER_REPLICA {
            own.push(server.channel().await);
        }
        channels.push(own);
    }
    let mut conversations = Vec::new();
    for index in 0..CONVERSATIONS {
        let replica = &channels[index % channels.len()][0];
        conversations.push(create_conversation(replica, SENDER, &[OTHER]).await);
    }
    // One warm-up send per conversation, through every replica.
    for (index, conversation_id) in conversations.iter().enumerate() {
        let mut client = MessagingServiceClient::new(channels[index % channels.len()][0].clone());
        send(&mut client, conversation_id, format!("w{round}-{index}"))
            .await
            .expect("warm-up send");
    }

    let nodes = redis_nodes(config.cluster);
    let mut cpu_before = Vec::new();
    for node in &nodes {
        cpu_before.push(node.cpu_seconds().await);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for task in 0..CLIENT_TASKS {
        let replica = &channels[task % channels.len()];
        let client =
            MessagingServiceClient::new(replica[(task / channels.len()) % replica.len()].clone());
        let conversation_id = conversations[task % conversations.len()].clone();
        let (sent, errors) = (sent.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let id_prefix = format!("r{round}-t{task}");
            common::send_texts_until(
                client,
                SENDER,
                conversation_id,
                id_prefix,
                deadline,
                &sent,
                &errors,
            )
            .await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    let mut redis_ms_per_k = Vec::new();
    for (node, before) in nodes.iter().zip(cpu_before) {
        let used = node.cpu_seconds().await - before;
        redis_ms_per_k.push(used * 1000.0 / (sent.max(1) as f64 / 1000.0));
    }
    for server in servers {
        server.stop().await;
    }
    RoundResult {
        rate: sent as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
        redis_ms_per_k,
    }
}

async fn send(
    client: &mut MessagingServiceClient<Channel>,
    conversation_id: &str,
    client_message_id: String,
) -> Result<(), tonic::Status> {
    let request = SendMessageRequest {
        conversation_id: conversation_id.to_owned(),
        client_message_id,
        content: Some(Content::Text("hello from the scaling benchmark".to_owned())),
    };
    client.send_message(as_user(SENDER, request)).await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    if !common::invoked_by_cargo_bench("scaling") {
        return;
    }
    let rounds: usize = common::knob("SVC_BENCH_ROUNDS", 3);
    let seconds: f64 = common::knob("SVC_BENCH_SECONDS", 5.0);
    let duration = Duration::from_secs_f64(seconds);
    println!(
        "scaling: {CLIENT_TASKS} client tasks, {CONVERSATIONS} conversations, {seconds} s per \
         configuration, {rounds} rounds, configurations interleaved"
    );
    let load_start = common::loadavg();
    let cpu_start = common::CpuSample::now();
    let mut results: Vec<Vec<RoundResult>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for (index, config) in CONFIGS.iter().enumerate() {
            let result = run(*config, round, duration).await;
            rows.push(vec![
                round.to_string(),
                config.name.to_owned(),
                format!("{:.0}", result.rate),
                result.errors.to_string(),
                result
                    .redis_ms_per_k
                    .iter()
                    .map(|ms| format!("{ms:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ]);
            println!("round {round} {}: {:.0} msgs/s", config.name, result.rate);
            results[index].push(result);
        }
    }
    let cpu = common::CpuSample::now().since(&cpu_start);

    println!("---- summary: scaling ----");
    print_table(
        &[
            "round",
            "configuration",
            "msgs/s",
            "errors",
            "Redis CPU ms per 1000 sends, per node",
        ],
        &rows,
    );
    println!();
    let reference = median(&results[0].iter().map(|r| r.rate).collect::<Vec<_>>());
    let mut summary = Vec::new();
    for (config, runs) in CONFIGS.iter().zip(&results) {
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let nodes = runs.first().map_or(0, |r| r.redis_ms_per_k.len());
        let per_node: Vec<String> = (0..nodes)
            .map(|node| {
                let values: Vec<f64> = runs.iter().map(|r| r.redis_ms_per_k[node]).collect();
                format!("{:.0}", median(&values))
            })
            .collect();
        let redis_total: f64 = (0..nodes)
            .map(|node| {
                median(
                    &runs
                        .iter()
                        .map(|r| r.redis_ms_per_k[node])
                        .collect::<Vec<_>>(),
                )
            })
            .sum();
        summary.push(vec![
            config.name.to_owned(),
            config.replicas.to_string(),
            if config.cluster {
                "3"
            } else {
                "1 (no cluster)"
            }
            .to_owned(),
            format!("{:.0}", median(&rates)),
            format!("{:.0}%", spread_percent(&rates)),
            format!("{:.2}", median(&rates) / reference),
            per_node.join(" / "),
            format!("{redis_total:.0}"),
        ]);
    }
    print_table(
        &[
            "configuration",
            "replicas",
            "Redis masters",
            "msgs/s (median)",
            "spread",
            "vs single-1",
            "Redis CPU ms / 1000 sends, per node",
            "Redis CPU ms / 1000 sends, all nodes",
        ],
        &summary,
    );
    println!();
    println!(
        "machine during the rounds: {cpu}; loadavg before {load_start}, after {}",
        common::loadavg()
    );
    println!("---- end ----");
}
