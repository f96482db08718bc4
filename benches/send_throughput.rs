//! SendMessage throughput of one replica on the Redis store, against `redis-benchmark` running
//! the Redis commands one send costs, interleaved in one run (raw, ours, raw, ours, ...).
//!
//! One text SendMessage on the Redis store is:
//!   1. `EVALSHA <append_message> 11 <keys> <10 args>` (src/store/redis/mod.rs `append_message`),
//!   2. one pipeline of `ZADD P:{u:USER}:convs GT <now> <conversation>` per participant
//!      (`touch_activity`), here 2 participants.
//!
//! The raw side runs (1) and (2) as two `redis-benchmark` runs against the same server, with the
//! keys and arguments of a real send (captured from a message the service stored), and combines
//! them into a per-send rate `1 / (1/r_eval + 2/r_zadd)`. See BENCHMARKS.md.
//!
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
use svc_messaging::{
    config::Settings,
    grpc::pb::{
        SendMessageRequest, messaging_service_client::MessagingServiceClient,
        send_message_request::Content,
    },
};
use tonic::transport::Channel;

const SENDER: &str = "alice";
const OTHER: &str = "bob";
/// Participants per conversation, so ZADDs per send in `touch_activity`.
const PARTICIPANTS: usize = 2;
const CONVERSATIONS: usize = 4;
const CLIENT_TASKS: usize = 32;
const CHANNELS: usize = 4;
/// The same concurrency for redis-benchmark.
const RAW_CLIENTS: usize = CLIENT_TASKS;

/// The append script exactly as the service builds it (`LuaScript::write`: prelude, newline, body).
fn append_script() -> String {
    format!(
        "{}\n{}",
        include_str!("../src/store/redis/prelude.lua"),
        include_str!("../src/store/redis/append_message.lua")
    )
}

#[tokio::main]
async fn main() {
    if !common::invoked_by_cargo_bench("send_throughput") {
        return;
    }
    let rounds: usize = common::knob("SVC_BENCH_ROUNDS", 3);
    let seconds: f64 = common::knob("SVC_BENCH_SECONDS", 5.0);
    let duration = Duration::from_secs_f64(seconds);

    let prefix = common::unique_prefix("send");
    let server = Server::start(&prefix, |_| {}).await;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(server.channel().await);
    }
    let redis = RedisCli::from_env();
    let raw = RawSend::prepare(&redis, &prefix).await;
    println!(
        "send_throughput: {CLIENT_TASKS} client tasks over {CHANNELS} HTTP/2 channels, \
         {CONVERSATIONS} conversations of {PARTICIPANTS}, {seconds} s per run, {rounds} rounds; \
         raw: redis-benchmark -c {RAW_CLIENTS}"
    );
    println!(
        "append script sha1 {} (already loaded by the service: yes)",
        raw.sha
    );

    // Warm-up (not reported): the service's connections and caches, and a calibration of how
    // many requests make a raw run last about `seconds`.
    let _ = ours_round(&channels, 0, Duration::from_secs(1)).await;
    let mut eval_n = 20_000;
    let mut zadd_n = 100_000;
    let warm = raw.round(&redis, &channels[0], 0, eval_n, zadd_n).await;
    eval_n = requests_for(warm.eval_rps, seconds);
    zadd_n = requests_for(warm.zadd_rps, seconds / 2.0);

    let cpu_start = common::CpuSample::now();
    let load_start = common::loadavg();
    let mut rows = Vec::new();
    let (mut raws, mut ourses, mut evals) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let raw_result = raw.round(&redis, &channels[0], round, eval_n, zadd_n).await;
        let ours = ours_round(&channels, round, duration).await;
        println!(
            "round {round}: raw EVALSHA {:.0}/s, ZADD {:.0}/s -> {:.0} sends/s; ours {:.0} msgs/s ({} sent, {} errors)",
            raw_result.eval_rps,
            raw_result.zadd_rps,
            raw_result.per_send(),
            ours.rate,
            ours.sent,
            ours.errors
        );
        assert_eq!(ours.errors, 0, "SendMessage failed during the run");
        rows.push(vec![
            round.to_string(),
            format!("{:.0}", raw_result.eval_rps),
            format!("{:.0}", raw_result.zadd_rps),
            format!("{:.0}", raw_result.per_send()),
            format!("{:.0}", ours.rate),
            format!("{:.2}", ours.rate / raw_result.per_send()),
        ]);
        raws.push(raw_result.per_send());
        evals.push(raw_result.eval_rps);
        ourses.push(ours.rate);
        eval_n = requests_for(raw_result.eval_rps, seconds);
        zadd_n = requests_for(raw_result.zadd_rps, seconds / 2.0);
    }
    let cpu = common::CpuSample::now().since(&cpu_start);

    let ratio = median(&ourses) / median(&raws);
    println!();
    println!("---- summary: send_throughput ----");
    print_table(
        &[
            "round",
            "raw EVALSHA/s",
            "raw ZADD/s",
            "raw sends/s",
            "ours msgs/s",
            "ours/raw",
        ],
        &rows,
    );
    println!();
    print_table(
        &["", "median", "spread (max-min)/median"],
        &[
            vec![
                "raw sends/s (EVALSHA + 2 ZADD)".to_owned(),
                format!("{:.0}", median(&raws)),
                format!("{:.0}%", spread_percent(&raws)),
            ],
            vec![
                "raw EVALSHA/s alone".to_owned(),
                format!("{:.0}", median(&evals)),
                format!("{:.0}%", spread_percent(&evals)),
            ],
            vec![
                "ours msgs/s".to_owned(),
                format!("{:.0}", median(&ourses)),
                format!("{:.0}%", spread_percent(&ourses)),
            ],
        ],
    );
    println!();
    println!(
        "ratio ours/raw (medians) = {ratio:.2}; goal >= 0.30: {}",
        if ratio >= 0.3 { "MET" } else { "NOT MET" }
    );
    println!(
        "ratio ours/raw EVALSHA alone = {:.2}",
        median(&ourses) / median(&evals)
    );
    println!(
        "machine during the rounds: {cpu}; loadavg before {load_start}, after {}",
        common::loadavg()
    );
    println!("---- end ----");
    server.stop().await;
}

/// Requests for a raw run of about `seconds` at `rate`. A raw EVALSHA run appends to one
/// conversation, so it stays under `messaging.history_max_events` (100 000): past that, every
/// append also trims, which the service's runs (a few conversations) never reach.
fn requests_for(rate: f64, seconds: f64) -> usize {
    ((rate * seconds) as usize).clamp(10_000, 90_000)
}

struct OursResult {
    sent: u64,
    errors: u64,
    rate: f64,
}

/// `CLIENT_TASKS` tasks send text messages with unique client_message_ids into fresh
/// conversations for `duration`.
async fn ours_round(channels: &[Channel], round: usize, duration: Duration) -> OursResult {
    let mut conversations = Vec::new();
    for _ in 0..CONVERSATIONS {
        conversations.push(create_conversation(&channels[0], SENDER, &[OTHER]).await);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for task in 0..CLIENT_TASKS {
        let mut client = MessagingServiceClient::new(channels[task % channels.len()].clone());
        let conversation_id = conversations[task % conversations.len()].clone();
        let (sent, errors) = (sent.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let request = SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: format!("r{round}-t{task}-{n}"),
                    content: Some(Content::Text(format!("hello from the benchmark, #{n}"))),
                };
                match client.send_message(as_user(SENDER, request)).await {
                    Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("SendMessage failed: {status}");
                        }
                        0
                    }
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    OursResult {
        sent,
        errors: errors.load(Ordering::Relaxed),
        rate: sent as f64 / elapsed,
    }
}

/// The raw side: the EVALSHA and ZADD a send issues, run by redis-benchmark.
struct RawSend {
    sha: String,
    prefix: String,
    benchmark: String,
}

struct RawResult {
    eval_rps: f64,
    zadd_rps: f64,
}

impl RawResult {
    /// Sends per second if each send costs one EVALSHA and `PARTICIPANTS` ZADDs.
    fn per_send(&self) -> f64 {
        1.0 / (1.0 / self.eval_rps + PARTICIPANTS as f64 / self.zadd_rps)
    }
}

impl RawSend {
    /// Checks that the service already loaded the append script (so this copy of its text is
    /// exactly what it runs), then loads it with `SCRIPT LOAD` (a no-op then) for its SHA-1.
    async fn prepare(redis: &RedisCli, prefix: &str) -> Self {
        let script = append_script();
        let sha1sum = common::run_with_stdin(std::process::Command::new("sha1sum"), &script);
        let expected = sha1sum
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let exists = redis.call(&["SCRIPT", "EXISTS", &expected], None).await;
        assert_eq!(
            exists.trim(),
            "1",
            "the service has not loaded a script with this text: src/store/redis changed?"
        );
        let sha = redis.call(&["SCRIPT", "LOAD"], Some(&script)).await;
        assert_eq!(sha, expected, "SCRIPT LOAD answered {sha:?}");
        let benchmark = std::env::var("SVC_BENCH_REDIS_BENCHMARK")
            .unwrap_or_else(|_| "redis-benchmark".to_owned());
        Self {
            sha,
            prefix: prefix.to_owned(),
            benchmark,
        }
    }

    /// One raw measurement on a fresh conversation: EVALSHA run of `eval_n` calls, then a ZADD
    /// run of `zadd_n`.
    async fn round(
        &self,
        redis: &RedisCli,
        channel: &Channel,
        round: usize,
        eval_n: usize,
        zadd_n: usize,
    ) -> RawResult {
        let (keys, args, zadd) = self.command_template(redis, channel, round).await;

        // One call by hand first: the template must append, not be rejected or deduplicated.
        let concrete = |value: &String| value.replace("__rand_int__", &format!("{round:012}"));
        let numkeys = keys.len().to_string();
        let mut check: Vec<String> = vec!["EVALSHA".into(), self.sha.clone(), numkeys.clone()];
        check.extend(keys.iter().chain(&args).map(concrete));
        let reply = redis
            .call(&check.iter().map(String::as_str).collect::<Vec<_>>(), None)
            .await;
        assert_eq!(
            reply.lines().next(),
            Some("appended"),
            "the raw EVALSHA did not append: {reply}"
        );

        let mut eval: Vec<String> = vec!["EVALSHA".into(), self.sha.clone(), numkeys];
        eval.extend(keys.iter().chain(&args).cloned());
        let eval_rps = self.redis_benchmark(redis, eval_n, 1, &eval).await;
        let zadd_rps = self
            .redis_benchmark(redis, zadd_n, PARTICIPANTS, &zadd)
            .await;
        RawResult { eval_rps, zadd_rps }
    }

    /// Keys, arguments and the ZADD of a send, with `__rand_int__` where every call must differ
    /// (client_message_id, message id). Taken from a message the service itself stored in a new
    /// conversation, so the record JSON and fingerprint have the real shape and size.
    async fn command_template(
        &self,
        redis: &RedisCli,
        channel: &Channel,
        round: usize,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        const SEED_ID: &str = "seed-000000000000";
        let conversation = create_conversation(channel, SENDER, &[OTHER]).await;
        let mut client = MessagingServiceClient::new(channel.clone());
        let sent = client
            .send_message(as_user(
                SENDER,
                SendMessageRequest {
                    conversation_id: conversation.clone(),
                    client_message_id: SEED_ID.to_owned(),
                    content: Some(Content::Text(format!("hello from the benchmark, #{round}"))),
                },
            ))
            .await
            .expect("seed message")
            .into_inner()
            .message
            .unwrap();
        let message_id = sent.message_id;

        let base = format!("{}:{{c:{conversation}}}:", self.prefix);
        let stored = redis
            .call(&["HGET", &format!("{base}msg"), &message_id], None)
            .await;
        // "<seq>:<create_time_ms>:<record JSON>"
        let record = stored
            .splitn(3, ':')
            .nth(2)
            .expect("stored message")
            .to_owned();
        let idem = |client_id: &str| format!("{base}idem:{}:{SENDER}:{client_id}", SENDER.len());
        let remembered = redis.call(&["GET", &idem(SEED_ID)], None).await;
        let fingerprint = remembered
            .split_once('|')
            .expect("idempotency value")
            .1
            .to_owned();

        let random_client_id = "r-__rand_int__"; // 14 characters, like "r1-t12-3456"
        let random_message_id = format!("{}__rand_int__", &message_id[..24]);
        let record = record
            .replace(&message_id, &random_message_id)
            .replace(SEED_ID, random_client_id);

        let defaults = Settings::default().messaging;
        let mut keys: Vec<String> = [
            "meta", "members", "events", "etime", "msgs", "msg", "live", "senders", "read",
        ]
        .iter()
        .map(|name| format!("{base}{name}"))
        .collect();
        keys.push(format!("{base}by:{SENDER}"));
        keys.push(idem(random_client_id));
        let args = vec![
            base,
            conversation.clone(),
            format!("{}:events", self.prefix),
            defaults.history_max_events.to_string(),
            defaults.history_max_age.as_millis().to_string(),
            SENDER.to_owned(),
            random_message_id,
            record,
            fingerprint,
            defaults.idempotency_window.as_secs().to_string(),
        ];
        // Without GT: random scores would make most GT calls no-ops, while the service's
        // growing timestamps make each of its calls an update.
        let zadd = vec![
            "ZADD".to_owned(),
            format!("{}:{{u:{SENDER}}}:convs", self.prefix),
            "__rand_int__".to_owned(),
            conversation,
        ];
        (keys, args, zadd)
    }

    /// Runs redis-benchmark with `command`; returns its requests per second.
    async fn redis_benchmark(
        &self,
        redis: &RedisCli,
        requests: usize,
        pipeline: usize,
        command: &[String],
    ) -> f64 {
        let output = tokio::process::Command::new(&self.benchmark)
            .args(["-h", &redis.host, "-p", &redis.port])
            .args(["--user", "default", "-a", &redis.password])
            .args(["-c", &RAW_CLIENTS.to_string(), "-n", &requests.to_string()])
            .args(["-P", &pipeline.to_string(), "-r", "2000000000", "--csv"])
            .args(command)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run redis-benchmark");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "redis-benchmark failed: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
        // "p99_latency_ms","max_latency_ms", then one row. The test name is the command line
        // (with quotes and commas of its own), so rps is read from the end.
        let row = stdout
            .lines()
            .rfind(|line| !line.starts_with("\"test\"") && line.ends_with('"'))
            .unwrap_or_else(|| panic!("no result from redis-benchmark: {stdout}"));
        row.rsplit(',')
            .nth(6)
            .and_then(|rps| rps.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("unexpected redis-benchmark row: {row}"))
    }
}
