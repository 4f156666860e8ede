#!/bin/bash
# Stop everything this setup started, by PID.
E=/tmp/e2e
stop() { local n=$1 p; p=$(cat $E/pids/$n 2>/dev/null) || return; if kill -0 $p 2>/dev/null; then kill -TERM $p; for i in $(seq 20); do kill -0 $p 2>/dev/null || break; sleep 0.5; done; kill -0 $p 2>/dev/null && kill -KILL $p; fi; echo "stopped $n ($p)"; }
stop agent
stop manager
# manager may leave worker children: its pid-file
[ -f $E/mgr/manager.pid ] && p=$(cat $E/mgr/manager.pid) && kill -0 $p 2>/dev/null && kill -TERM $p
stop redis
stop etcd
runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D $E/pgdata stop -m fast
stop postgres
docker ps -a --filter label=ai.backend.agent-id=i-e2e -q | xargs -r docker rm -f
docker rmi e2e/python:3.11 >/dev/null 2>&1 && echo "removed tag e2e/python:3.11"
