#!/bin/bash
# Configure manager: manager.toml, alembic.ini, etcd config, schema, fixtures.
set -ex
mgr() { /tmp/e2e/venv/bin/backend.ai mgr -f /tmp/e2e/mgr/manager.toml "$@"; }
E=/tmp/e2e; M=$E/mgr; I=$E/install/ai/backend/install; V=$E/venv/bin
cd $M
cp $I/configs/manager.toml manager.toml
cp $I/configs/alembic.ini alembic.ini
sed -i -e 's/^num-proc = .*/num-proc = 1/' \
  -e 's/port = 8120/port = 15379/' -e 's/port = 8100/port = 15432/' -e 's/host = "localhost", port = 15432/host = "127.0.0.1", port = 15432/' \
  -e 's/port = 8081/port = 15081/' \
  -e 's/internal-addr = { host = "0.0.0.0", port = 18080 }/internal-addr = { host = "127.0.0.1", port = 15082 }/' \
  -e 's|^# ipc-base-path = .*|ipc-base-path = "/tmp/e2e/mgr/ipc"|' \
  -e 's|^pid-file = .*|pid-file = "/tmp/e2e/mgr/manager.pid"|' \
  -e 's|^path = "./logs"|path = "/tmp/e2e/mgr/logs"|' \
  -e 's/^colored = true/colored = false/' \
  -e 's/drivers = \["console"\]/drivers = ["console", "file"]/' \
  manager.toml
sed -i 's|localhost:8100|127.0.0.1:15432|' alembic.ini
mkdir -p ipc logs fixtures/manager
[ -f fixtures/manager/manager.key ] || mgr generate-rpc-keypair fixtures/manager manager
cat > etcd.volumes.json <<'J'
{"volumes": {"_types": {"group": "", "user": ""}, "default_host": "local:volume1",
 "proxies": {"local": {"client_api": "http://127.0.0.1:16021", "manager_api": "https://127.0.0.1:16022", "secret": "some-secret-shared-with-storage-proxy", "ssl_verify": "false"}},
 "exposed_volume_info": "percentage"}}
J
cat > etcd.config.json <<'J'
{"api": {"allow-openapi-schema-introspection": "no", "allow-graphql-schema-introspection": "no"},
 "redis": {"addr": "127.0.0.1:15390", "helper": {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "reconnect_poll_timeout": 0.3}}}
J
mgr etcd put-json "" etcd.volumes.json
mgr etcd put-json config etcd.config.json
mgr schema oneshot
# fixtures
python3 - <<'P'
import json
src="/tmp/e2e/install/ai/backend/install/fixtures/example-resource-presets.json"
d=json.load(open(src))
for t in d.values():
    for r in t:
        if isinstance(r.get("shared_memory"), str): r["shared_memory"]=int(r["shared_memory"])
json.dump(d, open("/tmp/e2e/mgr/resource-presets-fixed.json","w"), indent=1)
json.dump({"container_registries":[{"id":"7e6f3c9a-1111-4a44-b650-98201a2fb406","registry_name":"local","url":"http://localhost","type":"local","project":"e2e"}]},
          open("/tmp/e2e/mgr/local-registry.json","w"))
P
for f in $I/fixtures/example-users.json local-registry.json $I/fixtures/example-keypairs.json \
  $I/fixtures/example-resource-slot-types.json resource-presets-fixed.json \
  $I/fixtures/example-runtime-variants.json $I/fixtures/example-runtime-variant-presets.json \
  $I/fixtures/example-role-presets.json; do
  mgr fixture populate $f
done
mgr permissions provision || true
