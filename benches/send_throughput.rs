//! SendMessage throughput of one replica on the Redis store, against two `redis-benchmark`
//! baselines on the same Redis, interleaved in one run (raw, ours, raw, ours, ...):
//!   - raw `XADD <key> * f <200 bytes>` (issue 14's yardstick: the cheapest durable append),
//!   - raw `EVALSHA <append_message> 9 <keys> <11 args>`: the one command a text SendMessage
//!     costs Redis (src/store/redis/mod.rs `append_message`), with the keys and arguments of a
//!     real send (captured from a message the service stored).
//!
//! Then the Redis CPU time of a send at 2 and at 500 participants, and Redis bytes per stored
//! text message (100 000 messages). See BENCHMARKS.md.
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
/// Participants per conversation of the throughput runs.
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
    let mut xadd_n = 100_000;
    let warm = raw.round(&redis, &channels[0], 0, eval_n).await;
    eval_n = requests_for(warm.eval_rps, seconds);
    let warm_xadd = raw.xadd(&redis, xadd_n).await;
    xadd_n = xadd_requests_for(warm_xadd, seconds);

    let cpu_start = common::CpuSample::now();
    let load_start = common::loadavg();
    let mut rows = Vec::new();
    let (mut ourses, mut evals) = (Vec::new(), Vec::new());
    let mut xadds = Vec::new();
    for round in 1..=rounds {
        let xadd_rps = raw.xadd(&redis, xadd_n).await;
        let raw_result = raw.round(&redis, &channels[0], round, eval_n).await;
        let ours = ours_round(&channels, round, duration).await;
        println!(
            "round {round}: raw XADD {xadd_rps:.0}/s; raw EVALSHA {:.0}/s; ours {:.0} msgs/s ({} sent, {} errors); CPU per message: redis {:.1} µs, service + clients {:.1} µs",
            raw_result.eval_rps,
            ours.rate,
            ours.sent,
            ours.errors,
            ours.redis_cpu_us,
            ours.service_cpu_us
        );
        assert_eq!(ours.errors, 0, "SendMessage failed during the run");
        rows.push(vec![
            round.to_string(),
            format!("{xadd_rps:.0}"),
            format!("{:.2}", ours.rate / xadd_rps),
            format!("{:.0}", raw_result.eval_rps),
            format!("{:.0}", ours.rate),
            format!("{:.2}", ours.rate / raw_result.eval_rps),
            format!("{:.1}", ours.redis_cpu_us),
            format!("{:.1}", ours.service_cpu_us),
        ]);
        evals.push(raw_result.eval_rps);
        xadds.push(xadd_rps);
        ourses.push(ours.rate);
        xadd_n = xadd_requests_for(xadd_rps, seconds);
        eval_n = requests_for(raw_result.eval_rps, seconds);
    }
    let cpu = common::CpuSample::now().since(&cpu_start);

    println!();
    println!("---- summary: send_throughput ----");
    print_table(
        &[
            "round",
            "raw XADD/s",
            "ours/XADD",
            "raw EVALSHA/s",
            "ours msgs/s",
            "ours/EVALSHA",
            "ours: Redis CPU µs/msg",
            "ours: service+clients CPU µs/msg",
        ],
        &rows,
    );
    println!();
    print_table(
        &["", "median", "spread (max-min)/median"],
        &[
            vec![
                "raw XADD/s (200-byte field)".to_owned(),
                format!("{:.0}", median(&xadds)),
                format!("{:.0}%", spread_percent(&xadds)),
            ],
            vec![
                "raw EVALSHA/s (the send's one command)".to_owned(),
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
    let xadd_ratio = median(&ourses) / median(&xadds);
    println!(
        "ratio ours/raw XADD (medians) = {xadd_ratio:.2}; goal >= 0.30 (issue 14): {}",
        if xadd_ratio >= 0.3 { "MET" } else { "NOT MET" }
    );
    println!(
        "ratio ours/raw EVALSHA (medians) = {:.2}",
        median(&ourses) / median(&evals)
    );
    println!(
        "machine during the rounds: {cpu}; loadavg before {load_start}, after {}",
        common::loadavg()
    );
    println!("---- end ----");

    participants_cost(&redis, &channels[0], rounds).await;
    memory_per_message(&redis, &channels).await;
    server.stop().await;
}

/// Requests for a raw run of about `seconds` at `rate`. A raw EVALSHA run appends to one
/// conversation, so it stays under `messaging.history_max_events` (100 000): past that, every
/// append also trims, which the service's runs (a few conversations) never reach.
fn requests_for(rate: f64, seconds: f64) -> usize {
    ((rate * seconds) as usize).clamp(10_000, 90_000)
}

/// Requests for a raw XADD run of about `seconds` (the stream is deleted after each run).
fn xadd_requests_for(rate: f64, seconds: f64) -> usize {
    ((rate * seconds) as usize).clamp(50_000, 1_000_000)
}

struct OursResult {
    sent: u64,
    errors: u64,
    rate: f64,
    /// CPU per message (µs, user + sys from /proc): Redis' process, and this process (the
    /// service and its 32 clients, which cannot be told apart in-process).
    redis_cpu_us: f64,
    service_cpu_us: f64,
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
    let redis_pid = std::env::var("SVC_TEST_REDIS_PID").unwrap_or_default();
    let ticks_before = (
        common::process_ticks(&redis_pid),
        common::process_ticks("self"),
    );
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for task in 0..CLIENT_TASKS {
        let client = MessagingServiceClient::new(channels[task % channels.len()].clone());
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
    let per_message = |ticks: u64| ticks as f64 * 10_000.0 / sent.max(1) as f64;
    OursResult {
        sent,
        errors: errors.load(Ordering::Relaxed),
        rate: sent as f64 / elapsed,
        redis_cpu_us: per_message(common::process_ticks(&redis_pid) - ticks_before.0),
        service_cpu_us: per_message(common::process_ticks("self") - ticks_before.1),
    }
}

/// The raw side: the EVALSHA a send issues, and the XADD baseline, run by redis-benchmark.
struct RawSend {
    sha: String,
    prefix: String,
    benchmark: String,
}

struct RawResult {
    eval_rps: f64,
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

    /// One raw measurement on a fresh conversation: an EVALSHA run of `eval_n` calls.
    async fn round(
        &self,
        redis: &RedisCli,
        channel: &Channel,
        round: usize,
        eval_n: usize,
    ) -> RawResult {
        let (keys, args) = self.command_template(redis, channel, round).await;

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
        RawResult { eval_rps }
    }

    /// Keys and arguments of a send, with `__rand_int__` where every call must differ
    /// (client_message_id, message id). Taken from a message the service itself stored in a new
    /// conversation, so the record JSON and fingerprint have the real shape and size.
    async fn command_template(
        &self,
        redis: &RedisCli,
        channel: &Channel,
        round: usize,
    ) -> (Vec<String>, Vec<String>) {
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
        // The idempotency bucket of the seed: one HASH, field -> "<seq>|<time>|<fingerprint>".
        let idem_field = |client_id: &str| format!("{}:{SENDER}:{client_id}", SENDER.len());
        let buckets = redis
            .call(&["--scan", "--pattern", &format!("{base}idem:*")], None)
            .await;
        let bucket = buckets.lines().next().expect("an idempotency bucket");
        let remembered = redis
            .call(&["HGET", bucket, &idem_field(SEED_ID)], None)
            .await;
        let fingerprint = remembered
            .splitn(3, '|')
            .nth(2)
            .expect("idempotency value")
            .trim()
            .to_owned();

        let random_client_id = "r-__rand_int__"; // 14 characters, like "r1-t12-3456"
        let random_message_id = format!("{}__rand_int__", &message_id[..24]);
        let record = record
            .replace(&message_id, &random_message_id)
            .replace(SEED_ID, random_client_id);

        let defaults = Settings::default().messaging;
        let mut keys: Vec<String> = [
            "meta", "members", "events", "msgs", "msg", "dead", "senders", "read",
        ]
        .iter()
        .map(|name| format!("{base}{name}"))
        .collect();
        keys.push(format!("{base}by:{SENDER}"));
        let channel = format!("{base}live");
        let args = vec![
            base,
            conversation.clone(),
            channel,
            defaults.history_max_events.to_string(),
            defaults.history_max_age.as_millis().to_string(),
            SENDER.to_owned(),
            random_message_id,
            record,
            fingerprint,
            defaults.idempotency_window.as_secs().to_string(),
            idem_field(random_client_id),
        ];
        (keys, args)
    }

    /// The issue-14 baseline: `redis-benchmark -c 32 XADD <key> * f <200 bytes>` against the same
    /// Redis; requests per second. The stream is deleted afterwards.
    async fn xadd(&self, redis: &RedisCli, requests: usize) -> f64 {
        let key = format!("{}:raw-xadd", self.prefix);
        let command = [
            "XADD".to_owned(),
            key.clone(),
            "*".to_owned(),
            "f".to_owned(),
            "x".repeat(200),
        ];
        let rps = self.redis_benchmark(redis, requests, 1, &command).await;
        redis.call(&["DEL", &key], None).await;
        rps
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

/// Sends per measurement of the Redis time of a send.
const COST_SENDS: usize = 2_000;
/// Participants of the large conversation (issue 14: within 1.25 x of a send at 2).
const LARGE: usize = 500;

/// What Redis spent on `COST_SENDS` sends.
struct SendCost {
    /// Redis' own CPU time (INFO cpu, user + sys) per send, µs.
    cpu_us: f64,
    /// Commands per send (INFO commandstats calls, commands scripts call included).
    commands: f64,
}

/// Redis' CPU seconds (user + sys) and total command calls so far.
async fn redis_counters(redis: &RedisCli) -> (f64, u64) {
    let seconds = redis.cpu_seconds().await;
    let stats = redis.call(&["INFO", "commandstats"], None).await;
    let calls = stats
        .lines()
        .filter_map(|line| {
            line.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (seconds, calls)
}

/// Redis time of a send into a fresh conversation of `participants`, measured as the server's
/// CPU time over `COST_SENDS` sends by 8 concurrent clients (nothing else uses this Redis).
async fn send_cost(
    redis: &RedisCli,
    channel: &Channel,
    participants: usize,
    round: usize,
) -> SendCost {
    let others: Vec<String> = (1..participants).map(|i| format!("member-{i}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    // At most 100 users per request: create with the first 100, add the rest 100 at a time.
    let conversation = create_conversation(channel, SENDER, &refs[..refs.len().min(100)]).await;
    for batch in others.chunks(100).skip(1) {
        MessagingServiceClient::new(channel.clone())
            .add_participants(as_user(
                SENDER,
                svc_messaging::grpc::pb::AddParticipantsRequest {
                    conversation_id: conversation.clone(),
                    user_ids: batch.to_vec(),
                },
            ))
            .await
            .expect("add participants");
    }
    let send = |client: &mut MessagingServiceClient<Channel>, n: usize| {
        let request = SendMessageRequest {
            conversation_id: conversation.clone(),
            client_message_id: format!("cost{round}-{participants}-{n}"),
            content: Some(Content::Text(format!("hello from the benchmark, #{n}"))),
        };
        let mut client = client.clone();
        async move {
            client
                .send_message(as_user(SENDER, request))
                .await
                .expect("send")
        }
    };
    let mut client = MessagingServiceClient::new(channel.clone());
    send(&mut client, 0).await;
    let (cpu_before, calls_before) = redis_counters(redis).await;
    let per_task = COST_SENDS / 8;
    let mut tasks = Vec::new();
    for task in 0..8 {
        let futures: Vec<_> = (0..per_task)
            .map(|n| send(&mut client, 1 + task * per_task + n))
            .collect();
        tasks.push(tokio::spawn(async move {
            for future in futures {
                future.await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (cpu_after, calls_after) = redis_counters(redis).await;
    // The two INFO calls of the second sample are in the count: negligible against 2000 sends.
    SendCost {
        cpu_us: (cpu_after - cpu_before) * 1e6 / COST_SENDS as f64,
        commands: (calls_after - calls_before) as f64 / COST_SENDS as f64,
    }
}

/// Issue 14: the Redis time of a send at 500 participants against one at 2, interleaved.
async fn participants_cost(redis: &RedisCli, channel: &Channel, rounds: usize) {
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let two = send_cost(redis, channel, PARTICIPANTS, round).await;
        let many = send_cost(redis, channel, LARGE, round).await;
        rows.push(vec![
            round.to_string(),
            format!("{:.1}", two.cpu_us),
            format!("{:.1}", two.commands),
            format!("{:.1}", many.cpu_us),
            format!("{:.1}", many.commands),
            format!("{:.2}", many.cpu_us / two.cpu_us),
        ]);
        small.push(two.cpu_us);
        large.push(many.cpu_us);
    }
    let ratio = median(&large) / median(&small);
    println!();
    println!("---- summary: send cost by conversation size ----");
    print_table(
        &[
            "round",
            "2: Redis CPU µs/send",
            "2: commands/send",
            "500: Redis CPU µs/send",
            "500: commands/send",
            "500/2",
        ],
        &rows,
    );
    println!(
        "ratio 500/2 (medians of Redis CPU per send) = {ratio:.2}; goal <= 1.25: {}",
        if ratio <= 1.25 { "MET" } else { "NOT MET" }
    );
    println!("---- end ----");
}

/// Messages stored for the memory measurement.
const MEMORY_MESSAGES: usize = 100_000;

/// Issue 14: Redis bytes per stored text message (INFO memory used_memory delta over 100 000
/// messages in 4 conversations), against the record's encoded size (its JSON, as stored).
async fn memory_per_message(redis: &RedisCli, channels: &[Channel]) {
    use svc_messaging::{
        ids::{MessageId, UserId},
        messaging::model::{ClientId, MessageContent, MessageKind, MessageRecord},
    };
    let mut conversations = Vec::new();
    for _ in 0..CONVERSATIONS {
        conversations.push(create_conversation(&channels[0], SENDER, &[OTHER]).await);
    }
    let used = || async {
        let info = redis.call(&["INFO", "memory"], None).await;
        info.lines()
            .find_map(|line| {
                line.trim()
                    .strip_prefix("used_memory:")?
                    .parse::<u64>()
                    .ok()
            })
            .expect("used_memory")
    };
    let before = used().await;
    let next = Arc::new(AtomicU64::new(0));
    let record_bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..CLIENT_TASKS {
        let mut client = MessagingServiceClient::new(channels[task % channels.len()].clone());
        let conversations = conversations.clone();
        let (next, record_bytes) = (next.clone(), record_bytes.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= MEMORY_MESSAGES {
                    return;
                }
                let client_message_id = format!("mem-{n}");
                let text = format!("hello from the benchmark, #{n}");
                let request = SendMessageRequest {
                    conversation_id: conversations[n % conversations.len()].clone(),
                    client_message_id: client_message_id.clone(),
                    content: Some(Content::Text(text.clone())),
                };
                let sent = client
                    .send_message(as_user(SENDER, request))
                    .await
                    .expect("send")
                    .into_inner()
                    .message
                    .expect("message");
                let record = MessageRecord {
                    id: MessageId::parse(&sent.message_id).expect("message id"),
                    sender: UserId::parse(SENDER).unwrap(),
                    kind: MessageKind::Text,
                    client_message_id: ClientId::from_field(
                        "client_message_id",
                        &client_message_id,
                    )
                    .unwrap(),
                    content: Some(MessageContent { text, file: None }),
                };
                let encoded = serde_json::to_string(&record).unwrap().len();
                record_bytes.fetch_add(encoded as u64, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let after = used().await;
    let per_message = (after as f64 - before as f64) / MEMORY_MESSAGES as f64;
    let record = record_bytes.load(Ordering::Relaxed) as f64 / MEMORY_MESSAGES as f64;

    // Where it goes: MEMORY USAGE of the first conversation's keys.
    let base = format!(
        "{}:{{c:{}}}:",
        prefix_of(redis, &conversations[0]).await,
        conversations[0]
    );
    let listed = redis
        .call(&["--scan", "--pattern", &format!("{base}*")], None)
        .await;
    let mut breakdown: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for key in listed.lines().filter(|key| !key.is_empty()) {
        let name = key.strip_prefix(&base).unwrap_or(key);
        let group = if name.starts_with("idem:") {
            "idem:* (HASH per time bucket)"
        } else {
            name
        };
        let entry = breakdown.entry(group.to_owned()).or_default();
        entry.0 += 1;
        let bytes = redis
            .call(&["MEMORY", "USAGE", key, "SAMPLES", "0"], None)
            .await;
        entry.1 += bytes.trim().parse::<u64>().unwrap_or(0);
    }
    let messages_here = (MEMORY_MESSAGES / CONVERSATIONS) as f64;
    let rows: Vec<Vec<String>> = breakdown
        .iter()
        .map(|(name, (count, bytes))| {
            let total = *bytes;
            vec![
                name.clone(),
                count.to_string(),
                total.to_string(),
                format!("{:.1}", total as f64 / messages_here),
            ]
        })
        .collect();
    println!();
    println!("---- summary: memory per stored text message ----");
    println!(
        "{MEMORY_MESSAGES} messages in {CONVERSATIONS} conversations: used_memory {before} -> {after}"
    );
    println!(
        "Redis bytes per message = {per_message:.0}; record encoded (JSON) = {record:.0} bytes; \
         ratio = {:.2}; goal <= 1.5: {}",
        per_message / record,
        if per_message / record <= 1.5 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    println!("one conversation's keys ({messages_here} messages), MEMORY USAGE:");
    print_table(&["key", "keys", "bytes", "bytes/message"], &rows);
    println!("---- end ----");
}

/// The key prefix the service writes under (the bench's `unique_prefix`), found from a
/// conversation's meta key.
async fn prefix_of(redis: &RedisCli, conversation: &str) -> String {
    let listed = redis
        .call(
            &[
                "--scan",
                "--pattern",
                &format!("*:{{c:{conversation}}}:meta"),
            ],
            None,
        )
        .await;
    let key = listed.lines().next().expect("the conversation's meta key");
    key.split(":{c:").next().unwrap().to_owned()
}
