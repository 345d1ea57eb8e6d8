"""
Running Debian's ``wrk`` with ``bench/wrk/chain.lua`` and reading what its ``done()`` hook prints.
"""

import json

import attrs
from twisted.logger import Logger

from bench.chainlib.procs import ROOT

log = Logger()

SCRIPT = ROOT / "bench" / "wrk" / "chain.lua"
#: The line prefix the Lua ``done()`` hook prints before its JSON.
MARKER = b"BENCH_JSON "
THREADS = 2
#: wrk counts a request slower than this as a timeout and leaves it out of the latency histogram.
REQUEST_TIMEOUT_S = 30
#: How long past its duration a wrk run may take (connection set-up and teardown) before it is killed.
OVERRUN_S = 60


class WrkError(Exception):
    """wrk failed or printed no result."""


@attrs.frozen
class Load:
    """What one wrk run does: ``connections`` clients for ``duration_s``; think time 0 means saturation."""

    connections: int
    duration_s: int
    think_ms: tuple[int, int] = (500, 1500)
    body_bytes: int = 1024
    #: Same seed, same think times: chains compared at one level are loaded identically.
    seed: int = 1

    @property
    def saturating(self):
        return self.think_ms[1] == 0


@attrs.frozen
class Errors:
    """wrk's error counters: sockets that failed, answers >= 400, and requests slower than REQUEST_TIMEOUT_S."""

    connect: int = 0
    read: int = 0
    write: int = 0
    status: int = 0
    timeout: int = 0

    @property
    def total(self):
        return self.connect + self.read + self.write + self.status + self.timeout


@attrs.frozen
class WrkResult:
    """One wrk run, in the units the tables use (seconds, milliseconds)."""

    connections: int
    duration_s: float
    requests: int
    bytes: int
    errors: Errors
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self):
        return self.requests / self.duration_s if self.duration_s else 0.0

    def as_json(self):
        return dict(attrs.asdict(self), rps=self.rps)


def combine(results):
    """
    One result for several rounds of the same load on the same chain (``--rounds``): requests, bytes, errors and time
    add up, so req/s is that of all rounds together; p50/p90/p99 and the mean are the median of the rounds' (wrk gives
    no histogram to merge), the maximum the largest.
    """
    if len(results) == 1:
        return results[0]

    def median(values):
        values = sorted(values)
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2

    errors = Errors(**{field: sum(getattr(r.errors, field) for r in results) for field in attrs.fields_dict(Errors)})
    return WrkResult(
        connections=results[0].connections,
        duration_s=sum(r.duration_s for r in results),
        requests=sum(r.requests for r in results),
        bytes=sum(r.bytes for r in results),
        errors=errors,
        p50_ms=median(r.p50_ms for r in results),
        p90_ms=median(r.p90_ms for r in results),
        p99_ms=median(r.p99_ms for r in results),
        mean_ms=median(r.mean_ms for r in results),
        max_ms=max(r.max_ms for r in results),
    )


def command(load, url, threads=THREADS):
    """wrk's argv for ``load`` against ``url``."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{load.connections}",
        f"-d{load.duration_s}s",
        f"--timeout={REQUEST_TIMEOUT_S}s",
        f"--script={SCRIPT}",
        url,
    ]


def environment(load, headers):
    """The variables chain.lua reads; headers travel here rather than on a command line that ``ps`` shows."""
    return {
        "BENCH_BODY_BYTES": str(load.body_bytes),
        "BENCH_THINK_MIN_MS": str(load.think_ms[0]),
        "BENCH_THINK_MAX_MS": str(load.think_ms[1]),
        "BENCH_SEED": str(load.seed),
        "BENCH_HEADERS": "\n".join(f"{name}: {value}" for name, value in headers),
    }


def parse_output(output, connections):
    """The ``WrkResult`` in wrk's output (the line chain.lua's ``done()`` printed); WrkError when there is none."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            try:
                data = json.loads(line[len(MARKER) :])
            except ValueError:
                raise WrkError("wrk printed a malformed result line") from None
            return from_summary(data, connections)
    raise WrkError("wrk printed no result line: " + output[-300:].decode("utf-8", "replace").strip())


def from_summary(data, connections):
    """Convert the done() hook's JSON (microseconds) into a ``WrkResult`` (milliseconds, seconds)."""
    latency = data["latency_us"]
    return WrkResult(
        connections=connections,
        duration_s=data["duration_us"] / 1e6,
        requests=data["requests"],
        bytes=data["bytes"],
        errors=Errors(**data["errors"]),
        p50_ms=latency["p50"] / 1e3,
        p90_ms=latency["p90"] / 1e3,
        p99_ms=latency["p99"] / 1e3,
        mean_ms=latency["mean"] / 1e3,
        max_ms=latency["max"] / 1e3,
    )


async def run(reactor, supervisor, name, load, url, headers=()):
    """Run wrk once; its result, or WrkError when it fails, prints nothing usable or overruns its duration."""
    process = supervisor.spawn(name, command(load, url), capture=True, extra_env=environment(load, headers))

    def overran(result, timeout):
        process.signal("KILL")
        raise WrkError(f"wrk ran {OVERRUN_S} s past its duration and was killed")

    ended = process.ended
    ended.addTimeout(load.duration_s + OVERRUN_S, reactor, onTimeoutCancel=overran)
    code = await ended
    # Kept beside the children's logs: wrk's own summary is the first thing to read when a figure looks wrong.
    process.log_path.write_bytes(process.output)
    if code != 0:
        raise WrkError(f"wrk exited with {code}: " + process.output[-300:].decode("utf-8", "replace").strip())
    return parse_output(process.output, connections=load.connections)
