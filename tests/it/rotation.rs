//! The Redis password rotation of deploy/README.md's runbook, on two replicas: Redis accepts the
//! old and the new password (ACL), the replicas restart one at a time with the new
//! `redis.password_file`, the old password is dropped, and no call fails along the way.

use std::{path::Path, process::Command};

use crate::support::{
    PrivateRedis, TestServer, as_user, create_conversation, required_tool, text_request,
    unique_prefix,
};
use svc_messaging::{config::MessageBackend, grpc::pb};
use tonic::transport::Channel;

type Client = pb::messaging_service_client::MessagingServiceClient<Channel>;

const NEW_PASSWORD: &str = "rotated/n3w=pass";

fn acl(redis: &PrivateRedis, auth: &str, args: &[&str]) {
    let output = Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", auth)
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

/// A replica reading its Redis password from `password_file`, as the pods read the Secret.
async fn replica(redis: &PrivateRedis, prefix: &str, password_file: &Path) -> TestServer {
    let url = format!("redis://default@127.0.0.1:{}/0", redis.port);
    let prefix = prefix.to_owned();
    let password_file = password_file.to_owned();
    TestServer::start_with(move |settings| {
        settings.storage.messages = MessageBackend::Redis;
        settings.redis.url = Some(url.into());
        settings.redis.key_prefix = prefix;
        settings.redis.password_file = Some(password_file);
        settings
            .read_secret_files()
            .expect("the password file reads");
    })
    .await
}

/// Sends one message through every replica in `serving`; every call must succeed.
async fn send_through_each(serving: &[&TestServer], id: &str, round: &mut u32) {
    for server in serving {
        *round += 1;
        Client::new(server.channel().await)
            .send_message(as_user(
                "alice",
                text_request(id, &format!("m{round}"), &format!("hello {round}")),
            ))
            .await
            .unwrap_or_else(|status| panic!("send {round} failed: {status:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_rotates_with_a_rolling_restart_and_no_failed_call() {
    let redis = PrivateRedis::start_volatile();
    let prefix = unique_prefix("rotation");
    let secrets = tempfile::tempdir().unwrap();
    let old_file = secrets.path().join("old");
    let new_file = secrets.path().join("new");
    std::fs::write(&old_file, &redis.password).unwrap();
    std::fs::write(&new_file, NEW_PASSWORD).unwrap();

    let a = replica(&redis, &prefix, &old_file).await;
    let b = replica(&redis, &prefix, &old_file).await;
    let id = create_conversation(&mut Client::new(a.channel().await), "alice", &["bob"]).await;
    let mut round = 0;
    send_through_each(&[&a, &b], &id, &mut round).await;

    // 1. Both passwords are accepted.
    acl(
        &redis,
        &redis.password,
        &[
            "ACL",
            "SETUSER",
            "default",
            "on",
            &format!(">{NEW_PASSWORD}"),
        ],
    );
    // 2-3. One replica at a time: out of the endpoints (what readiness does), drained, and
    //      replaced by one reading the new Secret; the other serves meanwhile.
    let mut a_old = a;
    a_old.begin_shutdown().await.unwrap().unwrap();
    send_through_each(&[&b], &id, &mut round).await;
    let a = replica(&redis, &prefix, &new_file).await;
    send_through_each(&[&a, &b], &id, &mut round).await;
    let mut b_old = b;
    b_old.begin_shutdown().await.unwrap().unwrap();
    send_through_each(&[&a], &id, &mut round).await;
    let b = replica(&redis, &prefix, &new_file).await;
    send_through_each(&[&a, &b], &id, &mut round).await;

    // 4. The old password is dropped: the replicas, on the new one, go on serving...
    acl(
        &redis,
        NEW_PASSWORD,
        &["ACL", "SETUSER", "default", &format!("<{}", redis.password)],
    );
    send_through_each(&[&a, &b], &id, &mut round).await;
    // ...and the old password really is refused now.
    let refused = Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", &redis.password)
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "PING"])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&refused.stdout).trim(), "PONG");

    // Nothing was lost: every message is in the history, in order.
    let mut history =
        crate::support::history(&mut Client::new(b.channel().await), "bob", &id).await;
    history.sort_by_key(|message| message.sequence);
    let texts: Vec<String> = history.iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (1..=round).map(|n| format!("hello {n}")).collect();
    assert_eq!(texts, expected);
}
