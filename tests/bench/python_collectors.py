#!/usr/bin/env python3
"""The baselines of bench-accounting: what the Python Backend.AI agent does every interval
to measure its kernel containers, in its two stat modes, as a process of its own.

- ``docker``: one ``GET /containers/{id}/stats?stream=false`` per container through
  aiodocker (``container.stats(stream=False)``), all containers at once with
  ``asyncio.gather``, reading CPU, memory, block I/O and network from the replies
  (the Python agent's default ``stats_type``).
- ``cgroup``: per container, the cgroup files (``cpuacct.usage``,
  ``memory.usage_in_bytes``, ``memory.stat``, ``memory.limit_in_bytes``,
  ``blkio.throttle.io_service_bytes``; their v2 counterparts on pure v2 hosts), and
  ``/proc/<pid>/net/dev`` with the pid from ``container.show()``, as the Python agent's
  cgroup mode does (cgroup paths resolved once per container and kept).

Usage: python_collectors.py MODE AGENT_ID INTERVAL_S DURATION_S
Prints one JSON line: {"mode", "containers", "cycles", "samples", "seconds", "cpu_seconds",
"max_rss_kib"}, where cpu_seconds is this process's CPU time (all threads, nanosecond clock)
over the measuring loop alone, start-up and imports left out.
"""

import asyncio
import json
import resource
import sys
import time

import aiodocker


def parse_net_dev(text):
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            continue
        numbers = fields.split()
        rx += int(numbers[0])
        tx += int(numbers[8])
    return rx, tx


def read(path):
    with open(path) as f:
        return f.read()


class CgroupPaths:
    """The container's controller directories, from /proc/<pid>/cgroup and the mounts."""

    def __init__(self, pid):
        mounts = {}
        self.v2 = None
        for line in read("/proc/self/mounts").splitlines():
            _, mount_point, fstype, options, *_ = line.split()
            if fstype == "cgroup2" and self.v2 is None:
                self.v2 = mount_point
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, mount_point)
        self.dirs = {}
        for line in read(f"/proc/{pid}/cgroup").splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in mounts:
                    self.dirs[controller] = mounts[controller] + path
            if controllers == "":
                self.unified = self.v2 + path
        self.hybrid = "memory" in self.dirs

    def measure(self):
        if self.hybrid:
            cpu_ms = int(read(self.dirs["cpuacct"] + "/cpuacct.usage")) / 1e6
            usage = int(read(self.dirs["memory"] + "/memory.usage_in_bytes"))
            stat = dict(line.split() for line in read(self.dirs["memory"] + "/memory.stat").splitlines())
            mem = usage - int(stat["total_inactive_file"])
            limit = int(read(self.dirs["memory"] + "/memory.limit_in_bytes"))
            io_read = io_write = 0
            for line in read(self.dirs["blkio"] + "/blkio.throttle.io_service_bytes").splitlines():
                fields = line.split()
                if len(fields) == 3 and fields[1] == "Read":
                    io_read += int(fields[2])
                elif len(fields) == 3 and fields[1] == "Write":
                    io_write += int(fields[2])
        else:
            stat = dict(line.split() for line in read(self.unified + "/cpu.stat").splitlines())
            cpu_ms = int(stat["usage_usec"]) / 1e3
            mem_stat = dict(line.split() for line in read(self.unified + "/memory.stat").splitlines())
            mem = int(read(self.unified + "/memory.current")) - int(mem_stat["inactive_file"])
            limit = read(self.unified + "/memory.max").strip()
            io_read = io_write = 0
            for line in read(self.unified + "/io.stat").splitlines():
                for field in line.split()[1:]:
                    key, _, value = field.partition("=")
                    if key == "rbytes":
                        io_read += int(value)
                    elif key == "wbytes":
                        io_write += int(value)
        return cpu_ms, mem, limit, io_read, io_write


async def docker_sample(container):
    stats = await container.stats(stream=False)
    if isinstance(stats, list):
        stats = stats[0]
    cpu_ms = stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e6
    mem = stats["memory_stats"]["usage"]
    limit = stats["memory_stats"]["limit"]
    io = stats["blkio_stats"]["io_service_bytes_recursive"] or []
    io_read = sum(entry["value"] for entry in io if entry["op"] == "Read")
    io_write = sum(entry["value"] for entry in io if entry["op"] == "Write")
    networks = stats.get("networks") or {}
    rx = sum(n["rx_bytes"] for n in networks.values())
    tx = sum(n["tx_bytes"] for n in networks.values())
    return cpu_ms, mem, limit, io_read, io_write, rx, tx


async def cgroup_sample(container, paths):
    info = await container.show()
    pid = info["State"]["Pid"]
    if container.id not in paths:
        paths[container.id] = CgroupPaths(pid)
    measured = paths[container.id].measure()
    rx, tx = parse_net_dev(read(f"/proc/{pid}/net/dev"))
    return (*measured, rx, tx)


async def main():
    mode, agent_id, interval, duration = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    docker = aiodocker.Docker()
    try:
        containers = await docker.containers.list(
            filters={"label": ["ai.backend.kernel-id", f"ai.backend.agent-id={agent_id}"]}
        )
        paths = {}
        cycles = samples = 0
        cpu_started = time.process_time()
        started = time.monotonic()
        while time.monotonic() - started < duration:
            cycle_start = time.monotonic()
            if mode == "docker":
                results = await asyncio.gather(*(docker_sample(c) for c in containers), return_exceptions=True)
            else:
                results = await asyncio.gather(*(cgroup_sample(c, paths) for c in containers), return_exceptions=True)
            samples += sum(1 for r in results if not isinstance(r, BaseException))
            cycles += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - cycle_start)))
        print(json.dumps({
            "mode": mode,
            "containers": len(containers),
            "cycles": cycles,
            "samples": samples,
            "seconds": time.monotonic() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }))
    finally:
        await docker.close()


if __name__ == "__main__":
    asyncio.run(main())
