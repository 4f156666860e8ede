#!/usr/bin/env python3
"""Calls a bai-agent through the real callosum library, the way Backend.AI's manager does.

Usage: callosum_client.py HOST:PORT

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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT")
    result = asyncio.run(asyncio.wait_for(main(sys.argv[1]), timeout=60))
    json.dump(result, sys.stdout, indent=1, sort_keys=True, default=repr)
    sys.stdout.write("\n")
