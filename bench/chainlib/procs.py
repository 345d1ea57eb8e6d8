"""
Child processes of the benchmark: spawned through ``guard`` (they die with the harness), logged to files, stopped
with TERM then KILL within a bounded grace period, and waited on with bounded loops only.
"""

import os
import socket
import sys
from pathlib import Path

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

log = Logger()

#: The repository root: children run there so ``python -m bench.chainlib.*`` resolves.
ROOT = Path(__file__).resolve().parents[2]

#: The most a captured output (wrk's) may hold; wrk prints a few KiB, anything more is noise to drop.
_CAPTURE_LIMIT = 1 << 20

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A child could not be started or did not start listening in time."""


@attrs.frozen
class Listening:
    """A started child that accepts connections on ``port`` of 127.0.0.1."""

    process: "ManagedProcess"
    port: int

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class ManagedProcess(ProcessProtocol):
    """One child: its exit is ``ended`` (fires with the exit code, or -signal); output goes to a file or is captured."""

    def __init__(self, name, log_path, capture):
        self.name = name
        self.log_path = log_path
        self._capture = capture
        self._output = bytearray()
        self.exit_code = None
        self.ended = Deferred()

    @property
    def running(self):
        return self.exit_code is None

    @property
    def pid(self):
        return self.transport.pid if self.transport is not None else None

    @property
    def output(self):
        return bytes(self._output)

    def childDataReceived(self, childFD, data):
        room = _CAPTURE_LIMIT - len(self._output)
        if self._capture and room > 0:
            self._output += data[:room]

    def processEnded(self, reason):
        value = reason.value
        self.exit_code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        log.debug("{name} ended with {code}", name=self.name, code=self.exit_code)
        self.ended.callback(self.exit_code)

    def signal(self, name):
        """Send ``name`` ("TERM", "KILL") unless the child has already ended."""
        if self.running:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def cpu_seconds(self):
        """User + system CPU time the child has used so far (0.0 once it has ended)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        # Fields 14 and 15 of proc(5) (utime, stime); the split above drops the first two.
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Supervisor:
    """Starts children and guarantees they are all stopped; ``stop_all`` runs before the reactor shuts down."""

    def __init__(self, reactor, log_dir, env=None, grace=5.0):
        self._reactor = reactor
        self._log_dir = Path(log_dir)
        self._env = dict(os.environ if env is None else env)
        self._env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self._env.get("PYTHONPATH")]))
        self._grace = grace
        self._children = []
        reactor.addSystemEventTrigger("before", "shutdown", self.stop_all)

    @property
    def children(self):
        """Every child started so far, in order."""
        return tuple(self._children)

    def spawn(self, name, argv, capture=False, extra_env=None):
        """Start ``argv`` as ``name``; stdout and stderr go to ``<log_dir>/<name>.log`` unless ``capture``."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        process = ManagedProcess(name, log_path, capture)
        env = dict(self._env, **(extra_env or {}))
        guarded = [sys.executable, "-m", "bench.chainlib.guard", str(os.getpid()), *argv]
        with open(log_path, "ab") as log_file:
            fds = {0: "w", 1: "r", 2: "r"} if capture else {0: "w", 1: log_file.fileno(), 2: log_file.fileno()}
            self._reactor.spawnProcess(process, guarded[0], guarded, env=env, path=str(ROOT), childFDs=fds)
        self._children.append(process)
        log.info("started {name} (pid {pid})", name=name, pid=process.pid)
        return process

    def stop_all(self):
        """TERM every running child, KILL those still running after the grace period; fires when all have ended."""
        running = [child for child in self._children if child.running]
        for child in running:
            child.signal("TERM")
        kill = self._reactor.callLater(self._grace, lambda: [child.signal("KILL") for child in running])
        done = DeferredList([child.ended for child in running])

        def cancel_kill(result):
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(cancel_kill)


def free_port():
    """A TCP port of 127.0.0.1 that is free right now (a child may lose it to a race: ``start_listening`` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_for_port(reactor, process, port, timeout=30.0, interval=0.05):
    """Poll until 127.0.0.1:``port`` accepts a connection; fail as soon as ``process`` ends or ``timeout`` passes."""
    deadline = reactor.seconds() + timeout
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
    while True:
        if not process.running:
            raise StartError(f"{process.name} exited ({process.exit_code}) before listening; see {process.log_path}")
        try:
            probe = await connectProtocol(endpoint, Protocol())
        except error.ConnectError:
            if reactor.seconds() >= deadline:
                raise StartError(f"{process.name} did not listen on {port} within {timeout:g} s") from None
            await deferLater(reactor, interval)
        else:
            probe.transport.loseConnection()
            return


async def start_listening(reactor, supervisor, name, argv_for_port, attempts=3, timeout=30.0, extra_env=None):
    """
    Start ``argv_for_port(port)`` (with ``extra_env`` added to its environment) on a free port and wait until it
    listens; retry on a lost port race.
    """
    for attempt in range(1, attempts + 1):
        port = free_port()
        process = supervisor.spawn(name, argv_for_port(port), extra_env=extra_env)
        try:
            await wait_for_port(reactor, process, port, timeout)
        except StartError:
            if process.running or attempt == attempts:
                process.signal("KILL")
                raise
            log.warn("{name} failed to start on {port}, retrying", name=name, port=port)
        else:
            return Listening(process, port)

