"""
Integration harness: a real upstream, a real relay site on 127.0.0.1 (memory or Redis registry), and clients, all
over real sockets in this process. Each piece registers its own cleanup on the test case.
"""

import os
import socket
import subprocess
import sys

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory

from mterelay.client import Client
from mterelay.codec import RelayIdentity
from mterelay.config import Settings
from mterelay.eager import EagerTCPReactor
from mterelay.redis_registry import RedisRegistry
from mterelay.registry import MemoryRegistry
from mterelay.site import build_site
from mterelay.upstream import make_agent, make_pool
from tests.redis_server import RedisServerMixin
from tests.upstream_server import UpstreamServer

SECRET = "an-example-client-id-secret-of-32+chars"
#: What the relays, clients and upstreams of these tests listen and connect through, as ``makeService`` wires it.
NETWORK = EagerTCPReactor(reactor)


async def serve(case, factory):
    """Listen with ``factory`` on 127.0.0.1 port 0; at cleanup stop listening and abort the connections still open."""
    wrapper = WrappingFactory(factory)
    port = await TCP4ServerEndpoint(NETWORK, 0, interface="127.0.0.1").listen(wrapper)

    def stop():
        for protocol in list(wrapper.protocols):
            protocol.transport.abortConnection()
        return port.stopListening()

    case.addCleanup(stop)
    return port.getHost().port


def agent(case, resend=True):
    """An Agent as the relay makes it, over its own persistent pool (``make_pool``), closed at cleanup."""
    pool = make_pool(reactor, resend)
    case.addCleanup(pool.closeCachedConnections)
    return make_agent(NETWORK, pool)


class RelayHarness(RedisServerMixin):
    """Mixin for trial test cases; ``registry_kind`` is ``"memory"`` or ``"redis"``."""

    registry_kind = "memory"

    async def start_upstream(self):
        upstream = await UpstreamServer(reactor).start()
        self.addCleanup(upstream.stop)
        return upstream

    def make_registry(self):
        if self.registry_kind == "memory":
            return MemoryRegistry(reactor)
        if not hasattr(self, "redis"):
            self.redis = self.start_redis()
        registry = RedisRegistry.from_url(self.redis.url, reactor)
        registry.startService()
        self.addCleanup(registry.stopService)
        return registry

    async def start_relay(self, upstream_url, registry=None, identity=None, cooperator=task, **settings):
        """Serve a relay for ``upstream_url``; returns ``(url, registry, identity)``."""
        settings = Settings(upstream=upstream_url, client_id_secrets=settings.pop("secrets", (SECRET,)), **settings)
        registry = self.make_registry() if registry is None else registry
        identity = RelayIdentity.generate() if identity is None else identity
        site = build_site(
            settings, reactor, agent(self), registry, identity, cooperator=cooperator, peer_agent=agent(self, False)
        )
        return f"http://127.0.0.1:{await serve(self, site)}", registry, identity

    def client(self, relay_url, **kwargs):
        return Client(relay_url, agent(self), reactor, **kwargs)

    async def raw_request(self, url, method, path, headers=None, data=None):
        """A plain request (no encoding) to ``url + path``; returns ``(status, body)``."""
        response = await HTTPClient(agent(self)).request(method, url + path, headers=headers, data=data)
        return response.code, await response.content()

    async def start_twistd(self, **environ):
        """
        Run ``twistd mterelay`` as its own process (so its memory can be measured alone) with ``environ`` added to
        this environment, on a free loopback port; returns ``(url, process)`` once it answers the echo route.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = dict(os.environ, CLIENT_ID_SECRET=SECRET, LISTEN=f"tcp:{port}:interface=127.0.0.1", **environ)
        log_path = os.path.abspath(self.mktemp())
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "--nodaemon", "--pidfile=", "mterelay"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=os.path.dirname(log_path),
            )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        url = f"http://127.0.0.1:{port}"
        http = HTTPClient(agent(self))
        for _ in range(200):
            try:
                response = await http.get(url + "/api/mte-echo/up")
                await response.content()
                return url, process
            except Exception:
                await deferLater(reactor, 0.05, lambda: None)
        with open(log_path, encoding="utf-8") as f:
            self.fail("the relay did not start: " + f.read()[-2000:])


def rss_kib(pid="self"):
    """VmRSS and VmHWM (peak) of process ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class _Collect(Protocol):
    """Sends raw bytes and collects everything the server sends until it closes the connection."""

    def __init__(self, data, half_close):
        self._data = data
        self._half_close = half_close
        self._received = []
        self.closed = Deferred()

    def connectionMade(self):
        self.transport.write(self._data)
        if self._half_close:
            self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self._received.append(data)

    def connectionLost(self, reason):
        self.closed.callback(b"".join(self._received))


async def raw_exchange(port, data, half_close=False):
    """
    Send ``data`` to 127.0.0.1:``port`` (then half-close, with ``half_close``): everything received until the server
    closed the connection.
    """
    collect = _Collect(data, half_close)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), collect)
    return await collect.closed.addTimeout(10, reactor)


class Arrivals:
    """
    A streamed body as it arrives: give ``write`` to a collector (``RelayResponse.collect``, ``treq.collect``), then
    ``await until(expected)`` for everything so far to be ``expected``, each wait bounded by ``timeout`` seconds (well
    below the relay's own timeouts, so that a stream held back shows as a timeout here).
    """

    def __init__(self, timeout=5):
        self._timeout = timeout
        self._received = []
        self._waiting = []

    def write(self, data):
        self._received.append(data)
        # A waiter resumes at once and may wait again: only those waiting now are woken.
        fired = self._waiting[:]
        self._waiting.clear()
        for waiter in fired:
            waiter.callback(None)

    async def until(self, expected):
        while b"".join(self._received) != expected:
            self._waiting.append(Deferred())
            await self._waiting[-1].addTimeout(self._timeout, reactor)
