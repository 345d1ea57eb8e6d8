"""
Registry benchmark: per-request operations per second, in memory and against a local redis-server it starts itself,
and the Redis round trips each relayed request costs.

    .venv/bin/python bench/registry.py [--requests N] [--concurrency N]

Per-request paths measured:
    MKE inbound   get_pair (answered from the Redis registry's short-lived copy when it has one), then mark_seen
                  once the message opened (a forged message must not burn a counter), checking the pair's creation
    MKE outbound  get_pair + reserve_counters
    MTE           get_pair + swap_state (the ratchet advance)
Round trips are the EVAL/EVALSHA commands Redis counted (``INFO commandstats``), per request: the registry sends no
other command once connected.
"""

import argparse
import itertools
import os
import sys
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mterelay.redis_registry import RedisRegistry  # noqa: E402
from mterelay.registry import MemoryRegistry, PairRecord  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

PAIRS = 100
WINDOW = 1024


def pair_ids(i):
    return f"client-{i % 10}", f"pair-{i}"


def mke_inbound(registry, counters):
    async def request(i):
        client_id, pair_id = pair_ids(i)
        record = await registry.get_pair(client_id, pair_id)
        if not await registry.mark_seen(client_id, pair_id, next(counters), WINDOW, created=record.created):
            raise RuntimeError("a fresh counter was taken for a replay")

    return request


def mke_outbound(registry, counters):
    async def request(i):
        client_id, pair_id = pair_ids(i)
        await registry.get_pair(client_id, pair_id)
        await registry.reserve_counters(client_id, pair_id)

    return request


def mte(registry, counters):
    async def request(i):
        client_id, pair_id = pair_ids(i)
        record = await registry.get_pair(client_id, pair_id)
        # Another in-flight request on the same pair may win: a relay would retry, the benchmark counts it.
        await registry.swap_state(client_id, pair_id, record.version, record.state)

    return request


PATHS = [("MKE inbound", mke_inbound), ("MKE outbound", mke_outbound), ("MTE", mte)]


async def run(request, requests, concurrency):
    """Requests per second, ``concurrency`` of them in flight at a time, each on one of the PAIRS pairs."""
    numbers = iter(range(requests))

    async def worker():
        for i in numbers:
            await request(i % PAIRS)

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    return requests / (time.perf_counter() - started)


def script_calls(server):
    stats = server.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", "calls=0").split(",")[0].split("=")[1]) for c in ("eval", "evalsha"))


async def bench(registry, label, options, server=None):
    for i in range(PAIRS):
        client_id, pair_id = pair_ids(i)
        await registry.create_pair(
            PairRecord(client_id=client_id, pair_id=pair_id, encode_type="MKE", state=os.urandom(600))
        )
    counters = itertools.count()
    for name, path in PATHS:
        before = script_calls(server) if server else 0
        sequential = await run(path(registry, counters), options.requests // 4, 1)
        calls = script_calls(server) - before if server else 0
        concurrent = await run(path(registry, counters), options.requests, options.concurrency)
        trips = f"{calls / (options.requests // 4):.2f}" if server else "-"
        print(f"{label:<7} {name:<13} {sequential:>12,.0f} {concurrent:>14,.0f} {trips:>12}")


async def main(reactor, options):
    print(f"{'store':<7} {'path':<13} {'req/s (1)':>12} {f'req/s ({options.concurrency})':>14} {'round trips':>12}")
    await bench(MemoryRegistry(reactor, max_pairs_per_client=PAIRS), "memory", options)
    server = RedisServer.start()
    try:
        registry = RedisRegistry.from_url(server.url, reactor, max_pairs_per_client=PAIRS)
        registry.startService()
        await registry.whenConnected()
        await bench(registry, "redis", options, server)
        await registry.stopService()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
