#!/bin/bash
# One session (no --assign-agent) with redis MONITOR capturing what the agent writes.
. /tmp/e2e/env.sh
N=${1:-e2e-s3}
timeout 60 redis-cli -p 15390 MONITOR > /tmp/e2e/logs/monitor-$N.txt 2>&1 &
MP=$!
sleep 1
timeout 120 backend.ai run -t $N --rm local/e2e/python:3.11 -c 'print("hi from", __import__("socket").gethostname())' 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
echo "run rc=${PIPESTATUS[0]}"
sleep 8
kill $MP 2>/dev/null
grep '"XADD"' /tmp/e2e/logs/monitor-$N.txt | grep '"source" "i-e2e"' | grep -v agent_heartbeat | sed 's/.*"name" "\([^"]*\)" "source" "i-e2e" "payload" /\1 /' | cut -c1-1200
