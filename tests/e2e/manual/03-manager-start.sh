#!/bin/bash
# Start the manager (port 15081); PID -> /tmp/e2e/pids/manager
E=/tmp/e2e; cd $E/mgr
setsid $E/venv/bin/backend.ai mgr -f $E/mgr/manager.toml start-server > $E/logs/manager.out 2>&1 &
echo $! > $E/pids/manager
for i in $(seq 90); do
  out=$(curl -s http://127.0.0.1:15081/ 2>/dev/null) && [ -n "$out" ] && { echo "ready after ${i}s: $out"; exit 0; }
  sleep 1
done
echo "manager not ready"; tail -50 $E/logs/manager.out; exit 1
