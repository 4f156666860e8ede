#!/bin/bash
# Show what the agent wrote to the events stream, the manager's agent list, and manager log lines about the agent.
E=/tmp/e2e
echo "== events from i-e2e (redis db 4, stream events), last 6"
redis-cli -p 15390 -n 4 --no-raw XRANGE events - + | python3 -c '
import sys,re
lines=[l.rstrip("\n") for l in sys.stdin]
# --no-raw prints numbered nested entries; fallback to raw parsing below
' 2>/dev/null
python3 - <<'P'
import subprocess
out=subprocess.run(["redis-cli","-p","15390","-n","4","XRANGE","events","-","+"],capture_output=True,text=True).stdout.split("\n")
ents=[];cur=None;i=0
while i<len(out):
    l=out[i]
    if l and l[0].isdigit() and "-" in l and l.replace("-","").isdigit():
        cur={"id":l};ents.append(cur);i+=1;continue
    if cur is not None and l in ("name","source","payload","metadata") and i+1<len(out):
        cur[l]=out[i+1];i+=2;continue
    i+=1
mine=[e for e in ents if e.get("source")=="i-e2e"]
print(len(ents),"entries,",len(mine),"from i-e2e")
for e in mine[-6:]:
    print(e["id"],e.get("name"));print("   payload:",e.get("payload","")[:3000]);print("   metadata:",e.get("metadata"))
P
echo "== installed_image:i-e2e"; redis-cli -p 15390 -n 0 GET installed_image:i-e2e | head -c 1500; echo
echo "== agents table"
runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -d backend -c "select id,status,region,scaling_group,addr,version,architecture,first_contact,lost_at from agents"
echo "== manager log (i-e2e / heartbeat / Malformed / errors)"
grep -n -i "i-e2e\|heartbeat\|malformed\|error\|traceback\|exception" $E/logs/manager.out | grep -v "plugin: overlay" | tail -40
