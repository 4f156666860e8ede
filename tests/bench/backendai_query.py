#!/usr/bin/env python3
"""Query-mode round trips of bench-backendai: the user's side of `backend.ai run -c CODE`
on an existing session, through Backend.AI's own client SDK (26.9.6) in one process, so that
each round trip is the manager, the agent and the kernel runner, not the CLI's start-up.

Per run, as the CLI's `exec_loop_sync` does: `execute(run_id, code, mode="query")`, then
`mode="continue"` with the returned run id until the status is `finished`.

Usage: backendai_query.py SESSION_NAME WARM_UP RUNS CODE EXPECTED_STDOUT
(the endpoint and keys from BACKEND_ENDPOINT, BACKEND_ACCESS_KEY, BACKEND_SECRET_KEY).
Prints one line per timed run: the seconds it took. Exits non-zero, saying why, when a run
does not finish with exit code 0 and the expected output.
"""

import sys
import time

from ai.backend.client.session import Session


def run_once(session, code):
    run_id, mode, stdout = None, "query", ""
    while True:
        result = session.execute(run_id, code, mode=mode)
        run_id = result["runId"]
        stdout += "".join(record[1] for record in result["console"] if record[0] == "stdout")
        if result["status"] == "finished":
            return stdout, result.get("exitCode")
        if result["status"] not in ("continued", "waiting-input", "build-finished", "clean-finished"):
            raise RuntimeError(f"unexpected execution status {result['status']!r}: {result!r}")
        mode, code = "continue", ""


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    name, warm_up, runs, code, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    with Session() as api:
        session = api.ComputeSession(name)
        for index in range(warm_up + runs):
            started = time.perf_counter()
            stdout, exit_code = run_once(session, code)
            elapsed = time.perf_counter() - started
            if exit_code != 0 or stdout.strip() != expected:
                sys.exit(f"run {index} of {code!r} in {name}: exit code {exit_code!r}, stdout {stdout!r}")
            if index >= warm_up:
                print(f"{elapsed:.6f}", flush=True)


if __name__ == "__main__":
    main()
