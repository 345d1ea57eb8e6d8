"""
``bench/chain``: measure chains against a baseline on loopback and write the table, a JSON file and a PNG chart.

Think-time mode (default): the relay chain (memory registry, then redis) against the control, the application
calling the upstream directly. ``--saturate``: no think time, the relay chain against the plain two-hop proxy chain.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import twisted
from treq import collect
from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from bench.chainlib import report, wrk
from bench.chainlib.procs import ROOT, StartError, Supervisor, start_listening
from bench.chainlib.targets import ChainUnavailable, Control, ProxyChain, RelayChain, relay_unavailable_reason
from bench.chainlib.upstream import response_body

log = Logger()

CHAINS = ("relay-memory", "relay-redis", "proxy", "proxy-tuned", "control")
#: The most of an answer the pre-flight check reads: the upstream's answer is body_bytes long.
PREFLIGHT_LIMIT = 1 << 20
PREFLIGHT_TIMEOUT_S = 15


class BenchError(Exception):
    """The benchmark cannot go on; the message says why, without secrets."""


def _levels(text):
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(level < wrk.THREADS or level % wrk.THREADS for level in levels):
        raise argparse.ArgumentTypeError(f"connections must be multiples of {wrk.THREADS} (wrk's threads)")
    return levels


def _think(text):
    low, _, high = text.partition(",")
    think = (int(low), int(high or low))
    if think[0] < 0 or think[1] < think[0]:
        raise argparse.ArgumentTypeError("think time is MIN,MAX milliseconds with 0 <= MIN <= MAX")
    return think


def _chains(text):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(names) - set(CHAINS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"chains are a comma list of {', '.join(CHAINS)}")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/chain", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds per run (default 60)")
    parser.add_argument("--connections", type=_levels, default=[100, 200, 250, 300], help="levels, e.g. 100,200")
    parser.add_argument("--saturate", action="store_true", help="no think time; baseline is the two-hop proxy chain")
    parser.add_argument("--chains", type=_chains, help="chains to measure (default relay-memory,relay-redis)")
    parser.add_argument("--think-ms", type=_think, default=(500, 1500), help="uniform think time MIN,MAX (ms)")
    parser.add_argument("--body-bytes", type=int, default=1024, help="request and response body size")
    parser.add_argument("--seed", type=int, default=1, help="think-time seed (same for every chain at a level)")
    parser.add_argument("--settle", type=float, default=2.0, help="pause between runs (s)")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="alternate the chains this many times per level, --duration/rounds seconds each, in rotating order "
             "(a shared machine drifts: the baseline and the relay then see the same moments); default 1",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="results go in a dated folder here")
    options = parser.parse_args(argv)
    if options.duration < 1 or options.body_bytes < 0 or not 1 <= options.rounds <= options.duration:
        parser.error("--duration must be >= 1, --body-bytes >= 0 and --rounds between 1 and --duration")
    options.chains = options.chains or ["relay-memory", "relay-redis"]
    if options.saturate:
        options.think_ms = (0, 0)
    baseline = "proxy" if options.saturate else "control"
    options.chains = [name for name in options.chains if name != baseline]
    if not options.chains:
        parser.error(f"--chains must name something other than the baseline ({baseline})")
    options.baseline = baseline
    return options


def machine():
    """What the figures were measured on (they mean little without it)."""
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    wrk_version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "wrk"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "wrk": wrk_version or "unknown",
    }


def loadavg():
    """The 1-minute load average: other work on this shared machine shows up here and skews the figures."""
    return float(Path("/proc/loadavg").read_text().split()[0])


async def preflight(client, reactor, name, endpoint, body_bytes):
    """One request through ``endpoint``: the chain must answer 200 with exactly the upstream's body."""
    request = client.post(endpoint.url, data=b"x" * body_bytes, headers={k: [v] for k, v in endpoint.headers})
    request.addTimeout(PREFLIGHT_TIMEOUT_S, reactor)
    response = await request
    received = bytearray()

    def keep(data):
        # Bounded: a chain that streams forever must not fill this process's memory.
        if len(received) < PREFLIGHT_LIMIT:
            received.extend(data[: PREFLIGHT_LIMIT - len(received)])

    reading = collect(response, keep)
    reading.addTimeout(PREFLIGHT_TIMEOUT_S, reactor)
    await reading
    if response.code != 200 or bytes(received) != response_body(body_bytes):
        shown = bytes(received[:200]).decode("utf-8", "replace")
        raise BenchError(f"{name} pre-flight: got {response.code} with {len(received)} bytes ({shown!r})")


def start_redis(reactor, supervisor, directory):
    """A redis-server of our own on a free port, persisting nothing, its files in ``directory``."""
    return start_listening(
        reactor,
        supervisor,
        "redis",
        lambda port: [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no",
        ],
    )


def build_chains(names, redis_url):
    """The ``IChain`` of each name."""
    made = {
        "control": Control(),
        "proxy": ProxyChain(),
        "proxy-tuned": ProxyChain("proxy-tuned", tuned=True),
        "relay-memory": RelayChain("memory"),
    }
    if redis_url:
        made["relay-redis"] = RelayChain("redis", redis_url)
    return [made[name] for name in names]


def cpu_by_chain(processes):
    """CPU seconds used so far by each chain's processes."""
    return {name: sum(process.cpu_seconds() for process in group) for name, group in processes.items()}


async def start_chains(reactor, supervisor, options, redis_dir):
    """
    Start the upstream, redis-server when a chain needs it, and every chain, each checked by a pre-flight request.

    Answers the chains in measuring order (baseline first), their endpoints, and the processes of each (by name).
    """
    if any(name.startswith("relay-") for name in options.chains):
        reason = relay_unavailable_reason()
        if reason:
            raise ChainUnavailable(reason)
    upstream = await start_listening(
        reactor,
        supervisor,
        "upstream",
        lambda port: [sys.executable, "-m", "bench.chainlib.upstream", "--port", str(port),
                      "--response-bytes", str(options.body_bytes), "--expect-bytes", str(options.body_bytes)],
    )
    redis_url = None
    if "relay-redis" in options.chains:
        redis_url = (await start_redis(reactor, supervisor, redis_dir)).url.replace("http://", "redis://")
    chains = build_chains([options.baseline, *options.chains], redis_url)
    endpoints, processes = {}, {"upstream": [upstream.process]}
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    for chain in chains:
        before = len(supervisor.children)
        endpoints[chain.name] = await chain.start(reactor, supervisor, upstream.url)
        processes[chain.name] = list(supervisor.children[before:])
        await preflight(client, reactor, chain.name, endpoints[chain.name], options.body_bytes)
    return chains, endpoints, processes


async def run_levels(reactor, supervisor, options, chains, endpoints, processes, meta):
    """
    Load every chain at every level, chains of one level back to back (in ``--rounds`` rounds, each starting one
    chain later); answers wrk's results by chain name, one per level (the rounds combined).
    """
    runs = {chain.name: [] for chain in chains}
    total = len(options.connections) * len(chains) * options.rounds
    done = 0
    for connections in options.connections:
        load = wrk.Load(
            connections, options.duration // options.rounds, options.think_ms, options.body_bytes, options.seed
        )
        rounds = {chain.name: [] for chain in chains}
        for round_ in range(options.rounds):
            for chain in chains[round_ % len(chains):] + chains[: round_ % len(chains)]:
                done += 1
                rounds[chain.name].append(await _run_one(reactor, supervisor, options, chain, endpoints, processes,
                                                         meta, load, f"{done}/{total}"))
        for chain in chains:
            runs[chain.name].append(wrk.combine(rounds[chain.name]))
    return runs


async def _run_one(reactor, supervisor, options, chain, endpoints, processes, meta, load, progress):
    """One wrk run of ``load`` on ``chain``, recorded in ``meta`` and printed; its result."""
    connections = load.connections
    await deferLater(reactor, options.settle)
    load_before, cpu_before = loadavg(), cpu_by_chain(processes)
    endpoint = endpoints[chain.name]
    result = await wrk.run(reactor, supervisor, f"wrk-{chain.name}-{connections}", load, endpoint.url, endpoint.headers)
    cpu = {name: used - cpu_before[name] for name, used in cpu_by_chain(processes).items()}
    meta["runs"].append({
        "chain": chain.name,
        "connections": connections,
        "duration_s": load.duration_s,
        "requests": result.requests,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu_seconds": cpu,
        "chain_cpu_ms_per_request": 1000 * cpu[chain.name] / result.requests if result.requests else None,
    })
    print(
        f"[{progress}] {chain.name:<13} c={connections:<4} "
        f"{result.requests:>8} req {result.rps:>9.1f} req/s  p50 {result.p50_ms:7.2f}  "
        f"p90 {result.p90_ms:7.2f}  p99 {result.p99_ms:7.2f} ms  errors {result.errors.total}  "
        f"cpu {cpu[chain.name]:.1f}s (upstream {cpu['upstream']:.1f}s)  load {load_before:.2f}",
        flush=True,
    )
    return result


async def measure(reactor, options, out_dir, meta):
    """Start everything, measure every level, answer wrk's results by chain name (children stop at shutdown)."""
    supervisor = Supervisor(reactor, out_dir / "logs")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as redis_dir:
        chains, endpoints, processes = await start_chains(reactor, supervisor, options, redis_dir)
        return await run_levels(reactor, supervisor, options, chains, endpoints, processes, meta)


def summarize(options, runs, meta, out_dir):
    """Print the tables, write results.json, table.txt and chart.png; answers the paths written."""
    targets = report.SATURATION_TARGETS if options.saturate else report.THINK_TARGETS
    think = "no think time" if options.saturate else f"think {options.think_ms[0]}-{options.think_ms[1]} ms"
    per_run = f"{options.duration} s per run" if options.rounds == 1 else (
        f"{options.rounds} alternating rounds of {options.duration // options.rounds} s per chain (latency: median of"
        " the rounds')"
    )
    load_text = f"{per_run}, {options.body_bytes} B request and response, {think}"
    tables, comparisons = [], {}
    for name in options.chains:
        compared = report.compare(runs[options.baseline], runs[name])
        comparisons[name] = [comparison.as_json(targets) for comparison in compared]
        tables.append(report.render(compared, options.baseline, name, load_text, targets))
    text = "\n\n".join(tables)
    print("\n" + text)
    document = {
        "mode": "saturate" if options.saturate else "think",
        "load": load_text,
        "baseline": options.baseline,
        "targets": {"min_rps_ratio": targets.min_rps_ratio, "max_p50_diff_ms": targets.max_p50_diff_ms,
                    "max_p99_diff_ms": targets.max_p99_diff_ms},
        "machine": meta["machine"],
        "command": meta["command"],
        "results": {name: [result.as_json() for result in results] for name, results in runs.items()},
        "comparisons": comparisons,
        "runs": meta["runs"],
    }
    paths = {"json": out_dir / "results.json", "table": out_dir / "table.txt", "chart": out_dir / "chart.png"}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    paths["table"].write_text(text + "\n")
    # Imported here: matplotlib is installed by bench/chain, it is not a dependency of the project or its tests.
    from bench.chainlib import chart

    title = f"mterelay bench/chain ({document['mode']}): {load_text}; {meta['machine']['cpus']} CPUs"
    chart.draw(paths["chart"], runs, title)
    return paths


def output_dir(root):
    """A fresh dated folder under ``root`` (bench/out/ by default, which git ignores)."""
    out_dir = root / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    return out_dir


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = output_dir(options.out)
    meta = {"machine": machine(), "command": ["bench/chain", *(sys.argv[1:] if argv is None else argv)], "runs": []}
    print(f"bench/chain: results in {out_dir}; children's logs in {out_dir / 'logs'}", flush=True)

    async def run(reactor):
        try:
            runs = await measure(reactor, options, out_dir, meta)
        except (BenchError, ChainUnavailable, StartError, wrk.WrkError) as failure:
            print(f"bench/chain: {failure}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        paths = summarize(options, runs, meta, out_dir)
        print("\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))

    react(lambda reactor: ensureDeferred(run(reactor)))
