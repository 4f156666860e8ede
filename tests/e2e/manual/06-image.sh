#!/bin/bash
# Tag the test image under the local registry's project and register it.
docker tag bai-test/python3:latest e2e/python:3.11
/tmp/e2e/venv/bin/backend.ai mgr -f /tmp/e2e/mgr/manager.toml image rescan local
runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -d backend -c "select name,registry,project,image,tag,architecture,is_local,status from images"
