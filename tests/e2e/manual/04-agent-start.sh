#!/bin/bash
# Start the Rust agent; PID -> /tmp/e2e/pids/agent
E=/tmp/e2e
setsid /tmp/bai-agent-e2e --config $E/agent.toml > $E/agent.log 2>&1 &
echo $! > $E/pids/agent
sleep 5; echo "agent pid $(cat $E/pids/agent)"; head -40 $E/agent.log
