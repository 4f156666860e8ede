#!/bin/bash
# A real Backend.AI 26.9.6 control plane on private loopback ports, for the end-to-end tests
# (tests/backendai_e2e.rs): PostgreSQL, etcd and Redis as plain processes, the manager from
# PyPI with its schema and fixtures. Everything lives in $E2E_DIR; every process is started in
# a session of its own and its PID written to $E2E_DIR/pids/<name>, and `down` stops exactly
# those process groups.
#
#   stack.sh up     start the services, configure the manager, start it, wait until it answers
#   stack.sh down   stop everything `up` started (by PID), in reverse order
#
# Inputs (the test sets them): E2E_DIR, E2E_VENV (a venv with backend.ai-manager and
# backend.ai-client), E2E_INSTALL (the unpacked backend.ai-install wheel: configs, fixtures),
# E2E_PG_PORT, E2E_ETCD_PORT, E2E_ETCD_PEER_PORT, E2E_REDIS_PORT, E2E_MANAGER_PORT,
# E2E_MANAGER_INTERNAL_PORT, E2E_PROMETHEUS_PORT (where the manager queries live stats),
# E2E_REGISTRY_PROJECT.
set -euo pipefail

: "${E2E_DIR:?}"
if [ "${1:-}" = up ]; then
  : "${E2E_VENV:?}" "${E2E_INSTALL:?}" "${E2E_PG_PORT:?}" "${E2E_ETCD_PORT:?}" "${E2E_ETCD_PEER_PORT:?}"
  : "${E2E_REDIS_PORT:?}" "${E2E_MANAGER_PORT:?}" "${E2E_MANAGER_INTERNAL_PORT:?}" "${E2E_PROMETHEUS_PORT:?}"
fi
: "${E2E_REGISTRY_PROJECT:=e2e}"

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
E=$E2E_DIR
M=$E/manager
LOGS=$E/logs
mkdir -p "$E/pids" "$LOGS" "$M"

log() { echo "[stack $(date +%T)] $*"; }

# Runs "$@" in a new session (its own process group), output to $LOGS/$name.log.
spawn() {
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$E/pids/$name"
}

wait_for() {
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$((seconds * 4))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  echo "$what did not come up within ${seconds}s" >&2
  return 1
}

psql_() { runuser -u postgres -- "$PG_BIN/psql" -h 127.0.0.1 -p "$E2E_PG_PORT" -v ON_ERROR_STOP=1 "$@"; }
mgr() { (cd "$M" && "$E2E_VENV/bin/backend.ai" mgr -f "$M/manager.toml" "$@"); }

start_services() {
  [ -n "$PG_BIN" ] || { echo "PostgreSQL is not installed (/usr/lib/postgresql/*/bin); cargo xtask setup installs it" >&2; exit 1; }
  log "PostgreSQL on $E2E_PG_PORT"
  mkdir -p "$E/pgdata" "$E/pgsock"
  chown postgres:postgres "$E/pgdata" "$E/pgsock"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$E/pgdata" -A trust -U postgres >"$LOGS/initdb.log" 2>&1
  spawn postgres runuser -u postgres -- "$PG_BIN/postgres" -D "$E/pgdata" -p "$E2E_PG_PORT" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories="$E/pgsock" -c max_connections=200 \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off
  log "etcd on $E2E_ETCD_PORT"
  spawn etcd etcd --name e2e --data-dir "$E/etcd" \
    --listen-client-urls "http://127.0.0.1:$E2E_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$E2E_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$E2E_ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$E2E_ETCD_PEER_PORT" \
    --initial-cluster "e2e=http://127.0.0.1:$E2E_ETCD_PEER_PORT"
  log "Redis on $E2E_REDIS_PORT"
  spawn redis redis-server --port "$E2E_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$E"
  wait_for PostgreSQL 30 psql_ -c 'select 1'
  psql_ -c "ALTER USER postgres PASSWORD 'develove'" >/dev/null
  psql_ -c "CREATE DATABASE backend" >/dev/null
  wait_for Redis 15 redis-cli -p "$E2E_REDIS_PORT" ping
  wait_for etcd 30 env ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$E2E_ETCD_PORT" endpoint health
}

configure_manager() {
  log "manager configuration"
  local I=$E2E_INSTALL/ai/backend/install
  sed -e 's/^num-proc = .*/num-proc = 1/' \
    -e "s/port = 8120/port = $E2E_ETCD_PORT/" \
    -e "s/host = \"localhost\", port = 8100/host = \"127.0.0.1\", port = $E2E_PG_PORT/" \
    -e "s/port = 8100/port = $E2E_PG_PORT/" \
    -e "s/port = 8081/port = $E2E_MANAGER_PORT/" \
    -e "s/internal-addr = { host = \"0.0.0.0\", port = 18080 }/internal-addr = { host = \"127.0.0.1\", port = $E2E_MANAGER_INTERNAL_PORT }/" \
    -e "s|^# ipc-base-path = .*|ipc-base-path = \"$M/ipc\"|" \
    -e "s|^pid-file = .*|pid-file = \"$M/manager.pid\"|" \
    -e "s|^path = \"./logs\"|path = \"$M/logs\"|" \
    -e 's/^colored = true/colored = false/' \
    -e 's/drivers = \["console"\]/drivers = ["console", "file"]/' \
    "$I/configs/manager.toml" >"$M/manager.toml"
  # The kernels' live stats: the manager queries Prometheus (which the test points at the agent).
  printf '\n[metric]\naddr = { host = "127.0.0.1", port = %s }\ntimewindow = "1m"\n' "$E2E_PROMETHEUS_PORT" >>"$M/manager.toml"
  sed -e "s|localhost:8100|127.0.0.1:$E2E_PG_PORT|" "$I/configs/alembic.ini" >"$M/alembic.ini"
  grep -q "port = $E2E_MANAGER_PORT" "$M/manager.toml" || { echo "manager.toml template changed: the API port was not set" >&2; exit 1; }
  mkdir -p "$M/ipc" "$M/logs" "$M/fixtures/manager"
  mgr generate-rpc-keypair "$M/fixtures/manager" manager >"$LOGS/keypair.log" 2>&1
  cat >"$M/etcd.volumes.json" <<'J'
{"volumes": {"_types": {"group": "", "user": ""}, "default_host": "local:volume1",
 "proxies": {"local": {"client_api": "http://127.0.0.1:9", "manager_api": "https://127.0.0.1:9", "secret": "e2e", "ssl_verify": "false"}},
 "exposed_volume_info": "percentage"}}
J
  cat >"$M/etcd.config.json" <<J
{"api": {"allow-openapi-schema-introspection": "no", "allow-graphql-schema-introspection": "no"},
 "redis": {"addr": "127.0.0.1:$E2E_REDIS_PORT", "helper": {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "reconnect_poll_timeout": 0.3}}}
J
  mgr etcd put-json "" "$M/etcd.volumes.json" >"$LOGS/etcd-put.log" 2>&1
  mgr etcd put-json config "$M/etcd.config.json" >>"$LOGS/etcd-put.log" 2>&1
  log "schema"
  mgr schema oneshot >"$LOGS/schema.log" 2>&1
  log "fixtures"
  "$E2E_VENV/bin/python" - "$I/fixtures/example-resource-presets.json" "$M" "$E2E_REGISTRY_PROJECT" <<'P'
import json, sys
presets, out, project = sys.argv[1], sys.argv[2], sys.argv[3]
data = json.load(open(presets))
# The example presets give shared_memory as a string, which this version's loader refuses.
for rows in data.values():
    for row in rows:
        if isinstance(row.get("shared_memory"), str):
            row["shared_memory"] = int(row["shared_memory"])
json.dump(data, open(f"{out}/resource-presets.json", "w"))
json.dump({"container_registries": [{"id": "7e6f3c9a-1111-4a44-b650-98201a2fb406", "registry_name": "local",
           "url": "http://localhost", "type": "local", "project": project}]},
          open(f"{out}/local-registry.json", "w"))
P
  for f in "$I/fixtures/example-users.json" "$M/local-registry.json" "$I/fixtures/example-keypairs.json" \
    "$I/fixtures/example-resource-slot-types.json" "$M/resource-presets.json" \
    "$I/fixtures/example-runtime-variants.json" "$I/fixtures/example-runtime-variant-presets.json" \
    "$I/fixtures/example-role-presets.json"; do
    mgr fixture populate "$f" >>"$LOGS/fixtures.log" 2>&1
  done
  mgr permissions provision >>"$LOGS/fixtures.log" 2>&1 || true
}

start_manager() {
  log "manager on $E2E_MANAGER_PORT"
  spawn manager bash -c "cd '$M' && exec '$E2E_VENV/bin/backend.ai' mgr -f '$M/manager.toml' start-server"
  if ! wait_for manager 180 curl -sf "http://127.0.0.1:$E2E_MANAGER_PORT/"; then
    tail -60 "$LOGS/manager.log" >&2
    exit 1
  fi
  log "manager ready"
}

stop_group() {
  local name=$1 pid
  pid=$(cat "$E/pids/$name" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$E/pids/$name"
}

case "${1:-}" in
  up)
    start_services
    configure_manager
    start_manager
    ;;
  down)
    stop_group manager
    stop_group redis
    stop_group etcd
    stop_group postgres
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
