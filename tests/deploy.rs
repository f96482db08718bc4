//! The Kubernetes manifests under `deploy/k8s`, as each environment really renders them
//! (`kubectl kustomize deploy/k8s/overlays/<env>`), checked against what the earlier service
//! learned the hard way: replica counts, the 100m CPU minimum of the testnet/mainnet LimitRange,
//! mainnet's limits, probes on real paths and ports, pod security, secrets only by reference, a
//! Redis password with `/` and `=`, shutdown timing, rollouts versus the PodDisruptionBudget, and
//! a config that the binary itself (`svc-messaging check-config`) accepts.
//!
//! Schema validation of the rendered YAML is `scripts/check-deploy` (kubernetes-validate).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::Value;
use svc_messaging::config::Settings;

/// What each environment must get.
struct Expected {
    env: &'static str,
    replicas: u64,
    /// Exact limits, where the environment prescribes them: (CPU millicores, memory bytes).
    limits: Option<(u64, u64)>,
    /// Replicas must land on different nodes.
    spread_over_nodes: bool,
}

const MI: u64 = 1024 * 1024;

const ENVIRONMENTS: &[Expected] = &[
    Expected {
        env: "devnet",
        replicas: 1,
        limits: None,
        spread_over_nodes: false,
    },
    Expected {
        env: "testnet",
        replicas: 1,
        limits: None,
        spread_over_nodes: false,
    },
    Expected {
        env: "mainnet",
        replicas: 2,
        limits: Some((500, 512 * MI)),
        spread_over_nodes: true,
    },
];

/// The LimitRange of testnet and mainnet refuses containers requesting less CPU than this.
const MIN_CPU_MILLIS: u64 = 100;
/// The Secret every credential comes from; never in the repo, only its example.
const SECRET_NAME: &str = "svc-messaging-secrets";
const CONTAINER: &str = "svc-messaging";
/// Switches the storage backends to the ones this version has: its validation refuses
/// `redis` and `s3` ("not available in this version") until issues 3 and 4 land.
const BACKENDS_AVAILABLE_TODAY: &[(&str, &str)] = &[
    ("SVC_MESSAGING__STORAGE__MESSAGES", "memory"),
    ("SVC_MESSAGING__STORAGE__BLOBS", "fs"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Realistic stand-ins for the Secret's values, by key: shaped like the real ones, so the
/// config checks meet what production feeds (a Redis password with '/' and '=', a 40-character
/// JWT secret, Garage-style S3 keys).
fn secret_placeholder(key: &str) -> &'static str {
    match key {
        "redis-password" => "Xq7/Lm9=pZ2/vR4+tK8==",
        "s3-access-key-id" => "GK0123456789abcdef01234567",
        "s3-secret-access-key" => {
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        }
        "jwt-secret" => "q3T/9vXk2LmN8pR4sW6yZ0aB1cD5eF7gH+iJ=Kl=",
        other => panic!(
            "the Deployment reads Secret key {other:?}, which this test has no placeholder for: \
             add one to secret_placeholder() and to deploy/k8s/secret.example.yaml"
        ),
    }
}

/// Stand-ins for the files of a mounted Secret, under the keys of a `kubernetes.io/tls` Secret
/// (and cert-manager's `ca.crt`): a self-signed certificate for the server and as the CA.
fn write_secret_file_stand_ins(dir: &Path) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = rcgen::CertificateParams::new(vec!["svc-messaging".to_owned()])
        .and_then(|params| params.self_signed(&key))
        .expect("a self-signed certificate");
    std::fs::create_dir_all(dir).expect("secret stand-in dir");
    for (file, contents) in [
        ("tls.crt", cert.pem()),
        ("tls.key", key.serialize_pem()),
        ("ca.crt", cert.pem()),
    ] {
        std::fs::write(dir.join(file), contents).expect("write a secret stand-in");
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering and navigating the manifests

/// One overlay rendered by `kubectl kustomize`, as JSON values (one per YAML document).
struct Rendered {
    env: &'static str,
    docs: Vec<Value>,
}

fn render(env: &'static str) -> Rendered {
    render_dir(&repo().join("deploy/k8s/overlays").join(env), env)
}

/// Renders the kustomization in `dir` (an overlay, or a variant of one), named `env`.
fn render_dir(dir: &Path, env: &'static str) -> Rendered {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run `{kubectl} kustomize` (kubectl is on the machine image): {error}")
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("rendered YAML is UTF-8");
    Rendered {
        env,
        docs: parse_yaml_documents(&text, env),
    }
}

fn parse_yaml_documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{what}: bad YAML: {error}"))
        })
        .filter(|value| !value.is_null())
        .collect()
}

fn every_environment() -> impl Iterator<Item = (&'static Expected, Rendered)> {
    ENVIRONMENTS
        .iter()
        .map(|expected| (expected, render(expected.env)))
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|doc| doc["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{}: expected exactly one {kind}", self.env);
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|doc| doc["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.env))
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn pod(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    fn pod_labels(&self) -> &serde_json::Map<String, Value> {
        self.deployment()["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap_or_else(|| panic!("{}: the pod template has no labels", self.env))
    }

    fn container(&self) -> &Value {
        self.pod()["containers"]
            .as_array()
            .and_then(|containers| containers.iter().find(|c| c["name"] == CONTAINER))
            .unwrap_or_else(|| panic!("{}: no container named {CONTAINER}", self.env))
    }

    /// Every container of every pod template in the overlay, init containers included (the
    /// LimitRange applies to each of them).
    fn all_containers(&self) -> Vec<(String, &Value)> {
        let mut found = Vec::new();
        for doc in &self.docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let pod = match kind {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    &doc["spec"]["template"]["spec"]
                }
                "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                "Pod" => &doc["spec"],
                _ => continue,
            };
            for list in ["initContainers", "containers"] {
                for container in pod[list].as_array().into_iter().flatten() {
                    let name = format!(
                        "{}/{} {list} {}",
                        kind,
                        doc["metadata"]["name"].as_str().unwrap_or("?"),
                        container["name"].as_str().unwrap_or("?")
                    );
                    found.push((name, container));
                }
            }
        }
        found
    }

    /// The container port a probe or Service names (by name or number).
    fn container_port(&self, port: &Value) -> u64 {
        let ports = self.container()["ports"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: the container declares no ports", self.env));
        let found = match port {
            Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
            Value::Number(number) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == number.as_u64()),
            other => panic!("{}: port {other} is neither a name nor a number", self.env),
        };
        found
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| {
                panic!(
                    "{}: port {port} is not a port of the container: the probe or Service \
                     would target nothing",
                    self.env
                )
            })
    }

    /// The config file the container reads: the `--config` path of its arguments, resolved
    /// through its volume mounts to the ConfigMap key behind it.
    fn config_toml(&self) -> String {
        let container = self.container();
        assert!(
            container["command"].is_null(),
            "{}: the container overrides the image's entrypoint; this test expects args only",
            self.env
        );
        let path = config_path(container)
            .unwrap_or_else(|| panic!("{}: the container is given no --config PATH", self.env));
        let path = Path::new(&path);
        let (mount, file) = (path.parent().unwrap(), path.file_name().unwrap());
        let volume_name = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == mount.to_str().unwrap())
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {}", self.env, mount.display()));
        let volume = self.pod()["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume_name.as_str())
            .unwrap_or_else(|| panic!("{}: no volume {volume_name}", self.env));
        let config_map = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: volume {volume_name} is not a ConfigMap", self.env));
        let file = file.to_str().unwrap();
        // Without `items`, each key is a file of the same name.
        let key = volume["configMap"]["items"]
            .as_array()
            .and_then(|items| items.iter().find(|item| item["path"] == file))
            .map_or(file, |item| item["key"].as_str().unwrap());
        self.named("ConfigMap", config_map)["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap {config_map} has no key {key}", self.env))
            .to_owned()
    }

    /// The Secret volumes the container mounts: (mount path, Secret name).
    fn secret_mounts(&self) -> Vec<(String, String)> {
        let volumes = self.pod()["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.container()["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|mount| {
                let volume = volumes.iter().find(|v| v["name"] == mount["name"])?;
                let secret = volume["secret"]["secretName"].as_str()?;
                Some((
                    mount["mountPath"].as_str().unwrap().to_owned(),
                    secret.to_owned(),
                ))
            })
            .collect()
    }

    /// The container's environment as the kubelet would set it, with each Secret value
    /// replaced by its placeholder.
    fn container_env(&self) -> Vec<(String, String)> {
        let container = self.container();
        assert!(
            container["envFrom"].is_null(),
            "{}: envFrom is not modelled by this test",
            self.env
        );
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|var| {
                let name = var["name"].as_str().unwrap().to_owned();
                let value = if let Some(value) = var["value"].as_str() {
                    value.to_owned()
                } else if let Some(reference) = var["valueFrom"]["secretKeyRef"].as_object() {
                    secret_placeholder(reference["key"].as_str().unwrap()).to_owned()
                } else {
                    panic!(
                        "{}: env {name} has a source this test does not model",
                        self.env
                    )
                };
                (name, value)
            })
            .collect()
    }

    fn int_or_percent(&self, value: &Value, of: u64, round_up: bool) -> u64 {
        match value {
            Value::Number(n) => n.as_u64().unwrap(),
            Value::String(s) => {
                let percent: u64 = s
                    .strip_suffix('%')
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("{}: bad int-or-percent {s:?}", self.env));
                if round_up {
                    (of * percent).div_ceil(100)
                } else {
                    of * percent / 100
                }
            }
            other => panic!("{}: bad int-or-percent {other}", self.env),
        }
    }
}

fn config_path(container: &Value) -> Option<String> {
    let args: Vec<&str> = container["args"]
        .as_array()?
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    args.iter().enumerate().find_map(|(i, arg)| {
        if *arg == "--config" {
            args.get(i + 1).map(|path| (*path).to_owned())
        } else {
            arg.strip_prefix("--config=").map(str::to_owned)
        }
    })
}

/// A label selector (`matchLabels`) selects the pod template's labels.
fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not modelled by this test"
    );
    matches_labels(&selector["matchLabels"], labels)
}

/// Every wanted label is on the pod (a Service's `selector` is such a plain map).
fn matches_labels(wanted: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    wanted.as_object().is_some_and(|wanted| {
        !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
    })
}

/// CPU quantity in millicores: "250m", "0.5", "2".
fn cpu_millis(quantity: &Value) -> u64 {
    let text = quantity_text(quantity);
    if let Some(millis) = text.strip_suffix('m') {
        return millis.parse().unwrap_or_else(|_| panic!("bad CPU {text}"));
    }
    let cores: f64 = text.parse().unwrap_or_else(|_| panic!("bad CPU {text}"));
    (cores * 1000.0).round() as u64
}

/// Memory quantity in bytes: "512Mi", "1Gi", "500M", "536870912".
fn memory_bytes(quantity: &Value) -> u64 {
    let text = quantity_text(quantity);
    let units: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad memory {text}"))
                * factor;
        }
    }
    text.parse().unwrap_or_else(|_| panic!("bad memory {text}"))
}

fn quantity_text(quantity: &Value) -> String {
    match quantity {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a quantity: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The config the pods get, seen by the service's own loader

/// The overlay's config file in a temp dir, and the Deployment's environment.
struct PodConfig {
    _dir: tempfile::TempDir,
    path: PathBuf,
    env: Vec<(String, String)>,
    /// The container's args with `--config` pointing at `path`.
    args: Vec<String>,
}

fn pod_config(rendered: &Rendered) -> PodConfig {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    // Files the config names in a mounted Secret are read from stand-ins in the temp dir.
    let mut config_toml = rendered.config_toml();
    for (mount_path, secret) in rendered.secret_mounts() {
        let stand_in = dir.path().join("secrets").join(&secret);
        write_secret_file_stand_ins(&stand_in);
        config_toml = config_toml.replace(
            &format!("\"{mount_path}/"),
            &format!("\"{}/", stand_in.display()),
        );
    }
    std::fs::write(&path, config_toml).expect("write config.toml");
    let original = config_path(rendered.container()).unwrap();
    let args = rendered.container()["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| {
            let arg = arg.as_str().unwrap();
            if arg == original {
                path.to_str().unwrap().to_owned()
            } else if arg == format!("--config={original}") {
                format!("--config={}", path.display())
            } else {
                arg.to_owned()
            }
        })
        .collect();
    PodConfig {
        env: rendered.container_env(),
        path,
        args,
        _dir: dir,
    }
}

impl PodConfig {
    /// The settings the service would run with, through `Settings::load_from` (the start-up
    /// path), with only the storage backends switched to today's ones.
    fn settings(&self, env: &str) -> Settings {
        let vars = self.env.iter().cloned().chain(
            BACKENDS_AVAILABLE_TODAY
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Settings::load_from(Some(&self.path), vars)
            .unwrap_or_else(|error| panic!("{env}: invalid config: {error}"))
    }

    /// The config file's own keys, before defaults and environment.
    fn file_value(&self, key: &str) -> Option<String> {
        config::Config::builder()
            .add_source(config::File::from(self.path.as_path()).format(config::FileFormat::Toml))
            .build()
            .expect("config.toml parses")
            .get_string(key)
            .ok()
    }

    /// Runs `svc-messaging check-config` as the pod would run the binary, plus `extra_env`.
    fn check_config(&self, extra_env: &[(&str, &str)]) -> (bool, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().copied())
            .args(&self.args)
            .arg("check-config")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run svc-messaging check-config");
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("svc-messaging check-config did not exit (did it start serving?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }
}

// ---------------------------------------------------------------------------------------------
// The facts

#[test]
fn every_overlay_is_one_of_the_tested_environments() {
    let mut overlays: Vec<String> = std::fs::read_dir(repo().join("deploy/k8s/overlays"))
        .expect("deploy/k8s/overlays")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    overlays.sort();
    let mut tested: Vec<&str> = ENVIRONMENTS.iter().map(|e| e.env).collect();
    tested.sort();
    assert_eq!(
        overlays, tested,
        "an overlay without expectations in this test"
    );
}

#[test]
fn each_overlay_renders_one_namespaced_service_and_no_secret() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        // Two Services: the ClusterIP one and its headless twin (tested below).
        assert_eq!(
            rendered.all("Service").len(),
            2,
            "{env}: expected two Services"
        );
        for kind in [
            "Deployment",
            "ConfigMap",
            "ServiceAccount",
            "PodDisruptionBudget",
        ] {
            rendered.one(kind);
        }
        assert!(
            rendered.all("Secret").is_empty(),
            "{env}: a Secret is rendered: real credentials must never be in the repo"
        );
        for doc in &rendered.docs {
            assert_eq!(
                doc["metadata"]["namespace"],
                format!("messaging-{env}"),
                "{env}: {} {} is not in the environment's namespace",
                doc["kind"],
                doc["metadata"]["name"]
            );
        }
        let image = rendered.container()["image"].as_str().unwrap();
        let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("");
        assert!(
            image.contains('/') && !tag.is_empty() && !tag.contains('/') && tag != "latest",
            "{env}: image {image:?} must be a registry image with a pinned tag"
        );
    }
}

#[test]
fn replicas_are_two_on_mainnet_and_one_elsewhere() {
    for (expected, rendered) in every_environment() {
        assert_eq!(
            rendered.deployment()["spec"]["replicas"].as_u64(),
            Some(expected.replicas),
            "{}: replicas",
            expected.env
        );
    }
}

#[test]
fn every_container_requests_at_least_100m_cpu_and_has_memory_limits() {
    for (expected, rendered) in every_environment() {
        let containers = rendered.all_containers();
        assert!(!containers.is_empty(), "{}: no containers", expected.env);
        for (name, container) in containers {
            let where_ = format!("{}: {name}", expected.env);
            let resources = &container["resources"];
            let request = &resources["requests"]["cpu"];
            assert!(!request.is_null(), "{where_}: no CPU request");
            let request = cpu_millis(request);
            assert!(
                request >= MIN_CPU_MILLIS,
                "{where_}: CPU request {request}m is under the LimitRange minimum of \
                 {MIN_CPU_MILLIS}m (testnet and mainnet refuse the pod)"
            );
            if !resources["limits"]["cpu"].is_null() {
                let limit = cpu_millis(&resources["limits"]["cpu"]);
                assert!(limit >= request, "{where_}: CPU limit under the request");
            }
            let memory_request = &resources["requests"]["memory"];
            let memory_limit = &resources["limits"]["memory"];
            assert!(
                !memory_request.is_null() && !memory_limit.is_null(),
                "{where_}: memory request and limit are required (the config is sized to them)"
            );
            assert!(
                memory_bytes(memory_request) <= memory_bytes(memory_limit),
                "{where_}: memory request above the limit"
            );
        }
    }
}

#[test]
fn mainnet_limits_are_500m_cpu_and_512mi_memory() {
    let mut checked = 0;
    for (expected, rendered) in every_environment() {
        let Some((cpu, memory)) = expected.limits else {
            continue;
        };
        let limits = &rendered.container()["resources"]["limits"];
        assert_eq!(
            cpu_millis(&limits["cpu"]),
            cpu,
            "{}: CPU limit",
            expected.env
        );
        assert_eq!(
            memory_bytes(&limits["memory"]),
            memory,
            "{}: memory limit",
            expected.env
        );
        checked += 1;
    }
    assert_eq!(checked, 1, "mainnet's limits are checked");
}

#[test]
fn listeners_ports_probes_and_service_agree() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let settings = pod_config(&rendered).settings(env);
        let (grpc, http) = (settings.server.grpc_addr, settings.server.http_addr);
        // Probes and the Service reach the pod IP, never its loopback.
        for addr in [grpc, http] {
            assert!(
                addr.ip().is_unspecified(),
                "{env}: the service listens on {addr}: kubelet probes and the Service cannot \
                 reach it; use 0.0.0.0"
            );
        }
        assert_eq!(
            rendered.container_port(&Value::from("grpc")),
            u64::from(grpc.port()),
            "{env}: container port grpc != server.grpc_addr"
        );
        assert_eq!(
            rendered.container_port(&Value::from("http")),
            u64::from(http.port()),
            "{env}: container port http != server.http_addr"
        );

        let container = rendered.container();
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{env}: {probe} path");
            assert!(
                get["scheme"].is_null() || get["scheme"] == "HTTP",
                "{env}: {probe} scheme (the HTTP port is plain HTTP)"
            );
            assert_eq!(
                rendered.container_port(&get["port"]),
                u64::from(http.port()),
                "{env}: {probe} must target the HTTP port (server.http_addr)"
            );
        }

        let service = rendered.named("Service", "svc-messaging");
        assert!(
            matches_labels(&service["spec"]["selector"], rendered.pod_labels()),
            "{env}: the Service selects no pod of the Deployment"
        );
        let ports = service["spec"]["ports"].as_array().unwrap();
        for (name, addr) in [("grpc", grpc), ("http", http)] {
            let port = ports
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{env}: the Service has no port named {name}"));
            assert_eq!(
                rendered.container_port(&port["targetPort"]),
                u64::from(addr.port()),
                "{env}: Service port {name} targets the wrong container port"
            );
        }
        assert!(
            selects(
                &rendered.deployment()["spec"]["selector"],
                rendered.pod_labels()
            ),
            "{env}: the Deployment's selector does not match its pods"
        );
    }
}

#[test]
fn a_headless_service_lists_every_ready_pod_for_client_side_balancing() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let headless = rendered.named("Service", "svc-messaging-headless");
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{env}: the headless Service needs clusterIP: None"
        );
        assert!(
            matches_labels(&headless["spec"]["selector"], rendered.pod_labels()),
            "{env}: the headless Service selects no pod of the Deployment"
        );
        // Draining pods must drop out of DNS, or per-call balancers keep sending to them.
        assert_ne!(
            headless["spec"]["publishNotReadyAddresses"], true,
            "{env}: the headless Service must list only Ready pods"
        );
        let server = pod_config(&rendered).settings(env).server;
        let port = headless["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "grpc")
            .unwrap_or_else(|| panic!("{env}: the headless Service has no grpc port"));
        assert_eq!(
            rendered.container_port(&port["targetPort"]),
            u64::from(server.grpc_addr.port()),
            "{env}: the headless Service's grpc port targets the wrong container port"
        );
        assert!(
            server.max_connection_age <= Duration::from_secs(60 * 60),
            "{env}: connections must be rebalanced (server.max_connection_age) within an hour"
        );
    }
}

#[test]
fn pods_run_non_root_read_only_without_capabilities() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let pod = rendered.pod();
        let pod_security = &pod["securityContext"];
        for (name, container) in rendered.all_containers() {
            let security = &container["securityContext"];
            let either = |key: &str| {
                if security[key].is_null() {
                    &pod_security[key]
                } else {
                    &security[key]
                }
            };
            assert_eq!(either("runAsNonRoot"), true, "{env}: {name}: runAsNonRoot");
            assert_ne!(either("runAsUser"), 0, "{env}: {name}: runs as uid 0");
            assert_eq!(
                either("seccompProfile")["type"],
                "RuntimeDefault",
                "{env}: {name}: seccomp profile"
            );
            assert_eq!(
                security["readOnlyRootFilesystem"], true,
                "{env}: {name}: readOnlyRootFilesystem"
            );
            assert_eq!(
                security["allowPrivilegeEscalation"], false,
                "{env}: {name}: allowPrivilegeEscalation"
            );
            assert_ne!(security["privileged"], true, "{env}: {name}: privileged");
            let drop = security["capabilities"]["drop"].as_array();
            assert!(
                drop.is_some_and(|drop| drop.iter().any(|c| c == "ALL")),
                "{env}: {name}: capabilities must drop ALL"
            );
            assert!(
                security["capabilities"]["add"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
                "{env}: {name}: adds capabilities"
            );
        }
        // A read-only root needs a writable /tmp.
        let tmp = rendered.container()["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == "/tmp")
            .unwrap_or_else(|| panic!("{env}: nothing writable is mounted at /tmp"));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == tmp["name"])
            .unwrap();
        assert!(
            volume["emptyDir"].is_object(),
            "{env}: /tmp is not an emptyDir"
        );
        // No API token in a pod that never calls the API.
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{env}: automountServiceAccountToken"
        );
        let account = pod["serviceAccountName"].as_str().unwrap();
        rendered.named("ServiceAccount", account);
    }
}

#[test]
fn mainnet_serves_grpc_over_tls_from_a_mounted_secret() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let config = config::Config::builder()
            .add_source(config::File::from_str(
                &rendered.config_toml(),
                config::FileFormat::Toml,
            ))
            .build()
            .expect("config.toml parses");
        let cert_file = config.get_string("server.tls.cert_file").ok();
        if env != "mainnet" && cert_file.is_none() {
            continue;
        }
        let cert_file = cert_file.unwrap_or_else(|| panic!("{env}: gRPC is served without TLS"));
        let key_file = config
            .get_string("server.tls.key_file")
            .unwrap_or_else(|_| panic!("{env}: server.tls.key_file"));
        let mounts = rendered.secret_mounts();
        for file in [&cert_file, &key_file] {
            let (mount_path, _) = mounts
                .iter()
                .find(|(path, _)| file.starts_with(&format!("{path}/")))
                .unwrap_or_else(|| panic!("{env}: {file} is not in a mounted Secret"));
            let mount = rendered.container()["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == mount_path.as_str())
                .unwrap();
            assert_eq!(mount["readOnly"], true, "{env}: {mount_path}");
            assert!(
                mount["subPath"].is_null(),
                "{env}: a subPath mount never sees a renewed Secret, so the certificate would \
                 never reload"
            );
        }
        // The certificate files load (stand-ins for the Secret's files).
        assert!(pod_config(&rendered).settings(env).server.tls.enabled());
    }
}

#[test]
fn secrets_reach_the_pod_only_by_reference_to_the_secret() {
    let example = std::fs::read_to_string(repo().join("deploy/k8s/secret.example.yaml"))
        .expect("deploy/k8s/secret.example.yaml");
    let example = &parse_yaml_documents(&example, "secret.example.yaml")[0];
    assert_eq!(example["kind"], "Secret");
    assert_eq!(example["metadata"]["name"], SECRET_NAME);
    let example_keys = example["stringData"].as_object().expect("stringData");
    for (key, value) in example_keys {
        let value = value.as_str().unwrap();
        assert!(
            value.starts_with('<') && value.ends_with('>'),
            "secret.example.yaml: {key} must be a <placeholder>, not a value"
        );
    }

    // Each secret setting: its variable, and the Secret key it must come from.
    let secret_settings = [
        ("SVC_MESSAGING__REDIS__PASSWORD", "redis-password"),
        ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "s3-access-key-id"),
        (
            "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
            "s3-secret-access-key",
        ),
        ("SVC_MESSAGING__AUTH__JWT_SECRET", "jwt-secret"),
    ];
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let vars = rendered.container()["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (name, key) in secret_settings {
            let var = vars
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{env}: {name} is not set from the Secret"));
            let reference = &var["valueFrom"]["secretKeyRef"];
            assert!(var["value"].is_null(), "{env}: {name} has a literal value");
            assert_eq!(reference["name"], SECRET_NAME, "{env}: {name} Secret name");
            assert_eq!(reference["key"], key, "{env}: {name} Secret key");
            assert_ne!(
                reference["optional"], true,
                "{env}: {name} must not be optional: a missing Secret should stop the pod"
            );
        }
        for (_, container) in rendered.all_containers() {
            for var in container["env"].as_array().into_iter().flatten() {
                let reference = &var["valueFrom"]["secretKeyRef"];
                if reference.is_object() {
                    assert_eq!(reference["name"], SECRET_NAME, "{env}: {}", var["name"]);
                    let key = reference["key"].as_str().unwrap();
                    assert!(
                        example_keys.contains_key(key),
                        "{env}: Secret key {key} is missing from secret.example.yaml"
                    );
                }
            }
        }

        // Nothing secret in the ConfigMap, and the Redis URL carries no password, so the raw
        // one (with '/' and '=') is never pasted into it.
        let config = pod_config(&rendered);
        for key in [
            "redis.password",
            "s3.access_key_id",
            "s3.secret_access_key",
            "auth.jwt_secret",
            "downloads.signing_key",
        ] {
            assert_eq!(
                config.file_value(key),
                None,
                "{env}: {key} is in the ConfigMap"
            );
        }
        let redis_url = config
            .file_value("redis.url")
            .unwrap_or_else(|| panic!("{env}: no redis.url"));
        let parsed = url::Url::parse(&redis_url).expect("redis.url parses");
        assert_eq!(parsed.password(), None, "{env}: redis.url holds a password");
    }
}

#[test]
fn termination_grace_covers_the_pre_stop_pause_and_the_shutdown_grace() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let pre_stop = &rendered.container()["lifecycle"]["preStop"];
        assert!(
            pre_stop["exec"].is_null(),
            "{env}: the image has no shell: preStop must not exec"
        );
        let pause = pre_stop["sleep"]["seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{env}: no preStop sleep, endpoints cannot drain"));
        assert!(
            (1..=15).contains(&pause),
            "{env}: preStop sleep {pause}s: long enough to drain endpoints, short enough"
        );
        let shutdown_grace = pod_config(&rendered).settings(env).server.shutdown_grace;
        let termination = rendered.pod()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        // The kubelet's clock includes the preStop hook; keep 5s for the exit itself.
        assert!(
            termination >= pause + shutdown_grace.as_secs() + 5,
            "{env}: terminationGracePeriodSeconds {termination} < preStop {pause}s + \
             server.shutdown_grace {shutdown_grace:?} + 5s: in-flight RPCs would be SIGKILLed"
        );
    }
}

#[test]
fn rolling_updates_never_drop_below_the_disruption_budget() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let deployment = rendered.deployment();
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
        let strategy = &deployment["spec"]["strategy"];
        assert_eq!(strategy["type"], "RollingUpdate", "{env}: strategy");
        // Kubernetes' defaults when unset: 25% each (unavailable rounds down, surge up).
        let max_unavailable = &strategy["rollingUpdate"]["maxUnavailable"];
        let max_unavailable = if max_unavailable.is_null() {
            Value::from("25%")
        } else {
            max_unavailable.clone()
        };
        let max_unavailable = rendered.int_or_percent(&max_unavailable, replicas, false);
        let max_surge = &strategy["rollingUpdate"]["maxSurge"];
        let max_surge = if max_surge.is_null() {
            Value::from("25%")
        } else {
            max_surge.clone()
        };
        assert!(
            max_unavailable > 0 || rendered.int_or_percent(&max_surge, replicas, true) > 0,
            "{env}: maxUnavailable and maxSurge both 0: the rollout cannot progress"
        );
        let during_rollout = replicas - max_unavailable.min(replicas);

        let pdb = rendered.one("PodDisruptionBudget");
        assert!(
            selects(&pdb["spec"]["selector"], rendered.pod_labels()),
            "{env}: the PodDisruptionBudget does not select the pods"
        );
        let budget_min = match (&pdb["spec"]["minAvailable"], &pdb["spec"]["maxUnavailable"]) {
            (min, Value::Null) if !min.is_null() => rendered.int_or_percent(min, replicas, true),
            (Value::Null, max) if !max.is_null() => {
                replicas - rendered.int_or_percent(max, replicas, true).min(replicas)
            }
            _ => panic!("{env}: the PDB sets neither or both of minAvailable/maxUnavailable"),
        };
        assert!(
            during_rollout >= budget_min && during_rollout >= 1,
            "{env}: a rollout may leave {during_rollout} pods, under the PDB's {budget_min} \
             (or none at all)"
        );
        if replicas > 1 {
            assert!(
                budget_min >= 1,
                "{env}: the PDB lets every replica be evicted"
            );
        } else {
            // minAvailable: 1 on a single replica would block every node drain.
            assert_eq!(budget_min, 0, "{env}: the PDB would block node drains");
        }
    }
}

#[test]
fn mainnet_replicas_are_spread_over_nodes() {
    for (expected, rendered) in every_environment() {
        if !expected.spread_over_nodes {
            continue;
        }
        let env = expected.env;
        let constraints = rendered.pod()["topologySpreadConstraints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let by_node = constraints
            .iter()
            .find(|c| c["topologyKey"] == "kubernetes.io/hostname")
            .unwrap_or_else(|| panic!("{env}: no topology spread over nodes"));
        assert_eq!(by_node["maxSkew"], 1, "{env}: maxSkew");
        assert_eq!(
            by_node["whenUnsatisfiable"], "DoNotSchedule",
            "{env}: both replicas could share a node"
        );
        assert!(
            selects(&by_node["labelSelector"], rendered.pod_labels()),
            "{env}: the spread constraint does not select the pods"
        );
    }
}

#[test]
fn the_config_is_in_cluster_and_the_memory_budget_fits_the_limit() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let config = pod_config(&rendered);
        assert_eq!(
            config.file_value("storage.messages").as_deref(),
            Some("redis")
        );
        assert_eq!(config.file_value("storage.blobs").as_deref(), Some("s3"));
        assert!(
            config
                .env
                .iter()
                .all(|(name, _)| !name.starts_with("SVC_MESSAGING__STORAGE__")),
            "{env}: the Deployment overrides the storage backends"
        );
        assert_eq!(config.file_value("auth.mode").as_deref(), Some("jwt"));
        assert_eq!(config.file_value("log.format").as_deref(), Some("json"));

        let settings = config.settings(env);
        let limit = memory_bytes(&rendered.container()["resources"]["limits"]["memory"]);
        let uploads = &settings.uploads;
        let workers = settings.thumbnails.workers as u64;
        assert!(
            workers > 0,
            "{env}: thumbnails.workers = 0 means one per core of the node: size it explicitly"
        );
        // Each decode holds the encoded image and one RGBA frame of the largest accepted size.
        let decode = uploads.max_image_pixels * 4 + uploads.image_max_size.as_u64();
        let peak = uploads.memory_budget.as_u64() + workers * decode;
        assert!(
            peak * 4 <= limit * 3,
            "{env}: uploads.memory_budget {} + {workers} thumbnail decode(s) of {} MiB = {} MiB \
             is over 75% of the {} MiB memory limit",
            uploads.memory_budget.as_u64() / MI,
            decode / MI,
            peak / MI,
            limit / MI
        );
    }
}

#[test]
fn the_config_passes_check_config_with_the_backends_available_today() {
    // Every key of each ConfigMap and env is checked by the binary; only the two backends that
    // this version refuses ("not available in this version") are swapped for memory/fs.
    for (expected, rendered) in every_environment() {
        let config = pod_config(&rendered);
        let (ok, output) = config.check_config(BACKENDS_AVAILABLE_TODAY);
        assert!(
            ok,
            "{}: check-config refused the config: {output}",
            expected.env
        );
        assert!(
            output.contains("config is valid"),
            "{}: {output}",
            expected.env
        );
    }
}

#[test]
fn the_config_passes_check_config_as_deployed() {
    for (expected, rendered) in every_environment() {
        let (ok, output) = pod_config(&rendered).check_config(&[]);
        assert!(
            ok,
            "{}: check-config refused the config: {output}",
            expected.env
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The probe paths exist on the running binary

/// The service binary started with an overlay's config; killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `GET path` over plain HTTP/1.1; the status code, or None when nothing answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_probe_paths_answer_200_on_the_running_service() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let config = pod_config(&rendered);
        let scratch = tempfile::tempdir().expect("temp dir");
        let (grpc, http): (SocketAddr, SocketAddr) = (
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        let log = scratch.path().join("service.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
            .env_clear()
            .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(BACKENDS_AVAILABLE_TODAY.iter().copied())
            .env(
                "SVC_MESSAGING__STORAGE__DATA_DIR",
                scratch.path().join("data"),
            )
            // Loopback on free ports instead of 0.0.0.0:50051/8080.
            .env("SVC_MESSAGING__SERVER__GRPC_ADDR", grpc.to_string())
            .env("SVC_MESSAGING__SERVER__HTTP_ADDR", http.to_string())
            .args(&config.args)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start svc-messaging");
        let mut running = Running { child, log };

        let container = rendered.container();
        let mut probes: BTreeMap<&str, String> = BTreeMap::new();
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            probes.insert(
                probe,
                container[probe]["httpGet"]["path"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = BTreeMap::new();
        loop {
            if let Some(status) = running.child.try_wait().expect("wait") {
                panic!(
                    "{env}: svc-messaging exited ({status}): {}",
                    std::fs::read_to_string(&running.log).unwrap_or_default()
                );
            }
            for (probe, path) in &probes {
                last.insert(*probe, http_status(http, path));
            }
            if last.values().all(|status| *status == Some(200)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{env}: probes did not all answer 200: {last:?}; log: {}",
                std::fs::read_to_string(&running.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The path a broken probe would have: the service really distinguishes.
        assert_eq!(http_status(http, "/no-such-probe"), Some(404), "{env}");
        TcpStream::connect_timeout(&grpc, Duration::from_secs(1))
            .unwrap_or_else(|error| panic!("{env}: the gRPC port does not accept: {error}"));
    }
}

// ---------------------------------------------------------------------------------------------
// The image: no container engine runs on the CI machine, so its recipe is checked statically.

#[test]
fn the_dockerfile_builds_a_small_non_root_image_without_healthcheck() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/deploy/Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "multi-stage: a build stage and a runtime stage"
    );
    assert!(froms[0].contains(" AS build"), "{}", froms[0]);
    assert!(
        froms[1].contains("distroless") && froms[1].contains("nonroot"),
        "the runtime image has no shell and a non-root user: {}",
        froms[1]
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.contains("cargo build --release --locked")),
        "a locked release build"
    );
    let user = instructions
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(!user.contains("root") || user.contains("nonroot"), "{user}");
    assert!(!user.contains(" 0") && !user.ends_with(":0"), "{user}");
    let expose = instructions
        .iter()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    assert!(
        expose.contains("50051") && expose.contains("8080"),
        "{expose}"
    );
    assert!(
        !instructions.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "Kubernetes probes check health, not the image"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("svc-messaging")),
        "the binary is the entrypoint"
    );

    // The build context keeps everything the build reads.
    let ignore = std::fs::read_to_string(format!("{root}/.dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "proto",
        "tests",
        "benches",
    ] {
        assert!(
            !ignored.iter().any(|pattern| {
                let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
                pattern == needed || pattern == "*" || pattern == "**"
            }),
            ".dockerignore must keep {needed}"
        );
    }
    for excluded in ["target", ".git"] {
        assert!(
            ignored
                .iter()
                .any(|pattern| pattern.trim_matches('/') == excluded),
            ".dockerignore should leave out {excluded}"
        );
    }
}

/// `deploy/k8s/variants/mainnet-aws`: mainnet on AWS S3 with IRSA. The pods' ServiceAccount
/// names an IAM role, no static S3 key reaches the pod, the config takes its credentials from the
/// AWS default chain, and the binary accepts that config.
#[test]
fn the_mainnet_aws_variant_uses_irsa_and_no_static_s3_keys() {
    let rendered = render_dir(
        &repo().join("deploy/k8s/variants/mainnet-aws"),
        "mainnet-aws",
    );
    let env = rendered.env;
    assert_eq!(
        rendered.deployment()["spec"]["replicas"],
        2,
        "{env}: replicas"
    );
    let account = rendered.pod()["serviceAccountName"].as_str().unwrap();
    let role = rendered.named("ServiceAccount", account)["metadata"]["annotations"]
        ["eks.amazonaws.com/role-arn"]
        .as_str()
        .unwrap_or_else(|| panic!("{env}: the ServiceAccount names no IAM role"));
    assert!(
        role.starts_with("arn:aws:iam::") && role.contains(":role/"),
        "{env}: {role} is not an IAM role ARN"
    );
    let vars = rendered.container_env();
    for static_key in [
        "SVC_MESSAGING__S3__ACCESS_KEY_ID",
        "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(
            vars.iter().all(|(name, _)| name != static_key),
            "{env}: {static_key} reaches the pod"
        );
    }
    let config = pod_config(&rendered);
    assert_eq!(
        config.file_value("s3.credentials").as_deref(),
        Some("chain")
    );
    assert_eq!(config.file_value("s3.endpoint"), None, "{env}: AWS's own");
    let (ok, output) = config.check_config(&[]);
    assert!(ok, "{env}: check-config refused the config: {output}");
}

/// The service reaches Garage by its in-namespace name, which no caller outside can open: the
/// download URLs must be signed for a public HTTPS endpoint instead.
#[test]
fn download_urls_are_signed_for_a_public_https_endpoint() {
    for (expected, rendered) in every_environment() {
        let env = expected.env;
        let config = pod_config(&rendered);
        let endpoint = config.file_value("s3.endpoint");
        let public = config
            .file_value("s3.public_endpoint")
            .unwrap_or_else(|| panic!("{env}: no s3.public_endpoint for {endpoint:?}"));
        let public = url::Url::parse(&public).expect("s3.public_endpoint parses");
        assert_eq!(public.scheme(), "https", "{env}: {public}");
        let internal = url::Url::parse(endpoint.as_deref().unwrap()).unwrap();
        assert_ne!(public.host_str(), internal.host_str(), "{env}");
    }
}
