#!/bin/bash
# Create a session on i-e2e, run code in it (query + batch), destroy it.
. /tmp/e2e/env.sh
N=${1:-e2e-s2}
set -x
timeout 180 backend.ai session create -t $N -r cpu=1 -r mem=2g --assign-agent i-e2e local/e2e/python:3.11; echo "create rc=$?"
backend.ai session list
timeout 90 backend.ai run -t $N local/e2e/python:3.11 -c 'import os; print(6*7, os.getcwd())'; echo "run rc=$?"
echo 'print("batch ok")' > /tmp/e2e/hello.py
(cd /tmp/e2e && timeout 90 backend.ai run -t $N --exec 'python3 hello.py' local/e2e/python:3.11 hello.py); echo "batch rc=$?"
timeout 90 backend.ai session destroy $N; echo "destroy rc=$?"
sleep 3; backend.ai session list --all | tail -5
docker ps -a --filter label=ai.backend.agent-id=i-e2e --format '{{.ID}} {{.Names}} {{.Status}}'
