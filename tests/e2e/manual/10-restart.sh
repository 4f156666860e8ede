#!/bin/bash
# Agent restart with a live session: start agent, create session, SIGTERM+restart the agent, run code again, destroy.
. /tmp/e2e/env.sh
E=/tmp/e2e
ps -p $(cat $E/pids/agent) >/dev/null 2>&1 || $E/04-agent-start.sh >/dev/null
sleep 3; backend.ai admin agent list 2>&1 | tail -1
timeout 120 backend.ai session create -t e2e-r1 -r cpu=1 -r mem=2g local/e2e/python:3.11 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
timeout 60 backend.ai run -t e2e-r1 local/e2e/python:3.11 -c 'x=41' 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
kill -TERM $(cat $E/pids/agent); sleep 4
mv $E/agent.log $E/agent.log.1; $E/04-agent-start.sh >/dev/null; sleep 4
backend.ai admin agent list 2>&1 | tail -1
timeout 60 backend.ai run -t e2e-r1 local/e2e/python:3.11 -c 'print("after restart", x+1)' 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
timeout 60 backend.ai session destroy e2e-r1
sleep 3; backend.ai session list --all | head -3
docker ps -a --filter label=ai.backend.agent-id=i-e2e --format '{{.ID}} {{.Names}} {{.Status}}'
