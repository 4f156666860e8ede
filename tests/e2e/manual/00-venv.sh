#!/bin/bash
set -e
PY=$(pyenv root 2>/dev/null || echo /root/.pyenv)/versions/3.13.0/bin/python3.13
[ -x "$PY" ] || PY=$(ls -d /*/.pyenv/versions/3.13.0/bin/python3.13 /opt/pyenv/versions/3.13.0/bin/python3.13 2>/dev/null | head -1)
$PY -m venv /tmp/e2e/venv
/tmp/e2e/venv/bin/pip install -q backend.ai-manager==26.9.6 backend.ai-client==26.9.6
mkdir -p /tmp/e2e/install && cd /tmp/e2e/install
/tmp/e2e/venv/bin/pip download -q --no-deps backend.ai-install==26.9.6 -d .
python3 -m zipfile -e backend_ai_install-26.9.6-*.whl .
