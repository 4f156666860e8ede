#!/bin/bash
# Session with a busy loop; read kernel live stats via redis and the manager's GraphQL.
. /tmp/e2e/env.sh
N=e2e-s4
timeout 120 backend.ai session create -t $N -r cpu=1 -r mem=2g local/e2e/python:3.11 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
timeout 60 backend.ai run -t $N local/e2e/python:3.11 -c 'import time
t=time.time()
x=0
while time.time()-t<4: x+=1
print("spun", x>0)' 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args"
sleep 6
SID=$(backend.ai session list --format id 2>/dev/null | awk 'NR>2{print $1}' | head -1)
KID=$(runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -d backend -tAc "select id from kernels where status='RUNNING' limit 1")
echo "kernel $KID"
/tmp/e2e/venv/bin/python - "$KID" <<'P'
import sys, redis
from ai.backend.common import msgpack
r=redis.Redis(port=15390, db=0)
v=r.get(sys.argv[1]); print("redis stat key:", None if v is None else {k:(vv.get("current") if isinstance(vv,dict) else vv) for k,vv in msgpack.unpackb(v).items()})
P
backend.ai admin session info $(backend.ai session list 2>/dev/null | awk '$1=="e2e-s4"{print $4}') 2>&1 | grep -v "UserWarning\|parser = \|self.parse_args" | head -40
timeout 60 backend.ai session destroy $N
