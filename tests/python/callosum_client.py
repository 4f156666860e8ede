#!/usr/bin/env python3
"""Calls a bai-agent through the real callosum library, the way Backend.AI's manager does.

Usage: callosum_client.py HOST:PORT
       callosum_client.py HOST:PORT lifecycle IMAGE

The second form creates one kernel with `create_kernels` as the manager does (UUID string
ids, a kernel creation config with more fields than the agent uses), checks it with
`check_running`, and destroys it with `destroy_kernel`.

The Peer is built as in Backend.AI's `manager/agent_cache.py` (`AgentRPCCache.rpc_context`):
a ZeroMQ DEALER transport with TCP keepalive options, msgpack with `use_bin_type=True` out and
`raw=False, use_list=False` in, snappy compression on (callosum's default), order key `""`,
and `invoke(method, {"args": ..., "kwargs": ...})`. Prints one JSON object with what each
call returned or raised; exits non-zero only when something unexpected happens.
"""

import asyncio
import json
import sys

import msgpack
import zmq
from callosum.lower.zeromq import ZeroMQAddress, ZeroMQRPCTransport
from callosum.rpc import Peer, RPCUserError

INVOKE_TIMEOUT = 10.0


def packb(data):
    return msgpack.packb(data, use_bin_type=True)


def unpackb(data):
    return msgpack.unpackb(data, raw=False, use_list=False)


def make_peer(addr: str, *, compress: bool = True) -> Peer:
    keepalive = 60
    return Peer(
        connect=ZeroMQAddress(f"tcp://{addr}"),
        transport=ZeroMQRPCTransport,
        authenticator=None,
        transport_opts={
            "zsock_opts": {
                zmq.TCP_KEEPALIVE: 1,
                zmq.TCP_KEEPALIVE_IDLE: keepalive,
                zmq.TCP_KEEPALIVE_INTVL: keepalive // 3,
                zmq.TCP_KEEPALIVE_CNT: 3,
            },
        },
        serializer=packb,
        deserializer=unpackb,
        compress=compress,
        invoke_timeout=INVOKE_TIMEOUT,
    )


async def call(peer: Peer, method: str, *args, order_key="", **kwargs):
    """What `PeerInvoker.call.<method>(*args, **kwargs)` does."""
    return await peer.invoke(method, {"args": args, "kwargs": kwargs}, order_key=order_key)


async def raised(coro):
    """The RPCUserError a call raises, as a dict; anything else propagates."""
    try:
        value = await coro
    except RPCUserError as e:
        return {"raised": type(e).__name__, "name": e.name, "repr": e.repr, "traceback": e.traceback}
    return {"raised": None, "value": value}


async def main(addr: str) -> dict:
    out = {}
    async with make_peer(addr) as peer:
        out["ping"] = await call(peer, "ping", "hello from callosum")
        out["ping_kwargs"] = await call(peer, "ping", msg="by keyword")
        # callosum's own default order key is b"" (bytes): the reply must echo it as bytes.
        out["ping_bytes_okey"] = await peer.invoke(
            "ping", {"args": ("bytes okey",), "kwargs": {}}, order_key=None
        )
        out["hwinfo"] = await call(peer, "gather_hwinfo")
        out["health"] = await call(peer, "health")
        out["local_config"] = await call(peer, "get_local_config")
        out["unknown"] = await raised(call(peer, "no_such_method", 1, 2))
        out["wrong_type"] = await raised(call(peer, "ping", 42))
        # The failures above must not have broken this peer's receive loop.
        out["ping_after_failures"] = await call(peer, "ping", "still here")
        out["concurrent"] = list(
            await asyncio.gather(*(call(peer, "ping", f"p{i}", order_key=f"k{i % 3}") for i in range(20)))
        )
    async with make_peer(addr, compress=False) as peer:
        out["ping_uncompressed"] = await call(peer, "ping", "no snappy")
    return out


async def lifecycle(addr: str, image: str) -> dict:
    import uuid

    global INVOKE_TIMEOUT
    INVOKE_TIMEOUT = 60.0  # the manager gives kernel operations far longer than a ping

    session_id, kernel_id = str(uuid.uuid4()), str(uuid.uuid4())
    config = {
        "image": {
            "canonical": image,
            "architecture": "x86_64",
            "project": None,
            "digest": "",
            "repo_digest": None,
            "registry": {"name": "local", "url": "http://127.0.0.1", "username": None, "password": None},
            "labels": {},
            "is_local": True,
        },
        "auto_pull": "digest",
        "session_type": "interactive",
        "cluster_mode": "single-node",
        "cluster_role": "main",
        "cluster_idx": 1,
        "local_rank": 0,
        "cluster_hostname": "main1",
        "uid": None,
        "main_gid": None,
        "supplementary_gids": [],
        "resource_slots": {"cpu": "1", "mem": "268435456"},
        "resource_opts": {"shmem": "67108864"},
        "environ": {"FROM_MANAGER": "yes"},
        "mounts": [],
        "package_directory": [],
        "idle_timeout": 600,
        "bootstrap_script": None,
        "startup_command": None,
        "internal_data": None,
        "preopen_ports": [],
        "owner_user_id": str(uuid.uuid4()),
        "owner_project_id": str(uuid.uuid4()),
    }
    cluster_info = {"mode": "single-node", "size": 1, "replicas": {"main": 1}, "network_name": None, "ssh_keypair": None}
    out = {"kernel_id": kernel_id, "session_id": session_id}
    async with make_peer(addr) as peer:
        created = await call(peer, "create_kernels", session_id, [kernel_id], [config], cluster_info, {kernel_id: image})
        out["created"] = created
        out["running"] = await call(peer, "check_running", kernel_id)
        out["destroyed"] = await call(peer, "destroy_kernel", kernel_id, session_id, "user-requested", False)
        out["after_destroy"] = await raised(call(peer, "check_running", kernel_id))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "lifecycle":
        work = lifecycle(sys.argv[1], sys.argv[3])
    elif len(sys.argv) == 2:
        work = main(sys.argv[1])
    else:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT [lifecycle IMAGE]")
    result = asyncio.run(asyncio.wait_for(work, timeout=90))
    json.dump(result, sys.stdout, indent=1, sort_keys=True, default=repr)
    sys.stdout.write("\n")
