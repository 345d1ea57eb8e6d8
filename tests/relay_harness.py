"""
Integration harness: a real upstream, a real relay site on 127.0.0.1 (memory or Redis registry), and clients, all
over real sockets in this process. Each piece registers its own cleanup on the test case.
"""

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool

from mterelay.client import Client
from mterelay.codec import RelayIdentity
from mterelay.config import Settings
from mterelay.redis_registry import RedisRegistry
from mterelay.registry import MemoryRegistry
from mterelay.site import build_site
from tests.redis_server import RedisServerMixin
from tests.upstream_server import UpstreamServer

SECRET = "an-example-client-id-secret-of-32+chars"


async def serve(case, factory):
    """Listen with ``factory`` on 127.0.0.1 port 0; at cleanup stop listening and abort the connections still open."""
    wrapper = WrappingFactory(factory)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(wrapper)

    def stop():
        for protocol in list(wrapper.protocols):
            protocol.transport.abortConnection()
        return port.stopListening()

    case.addCleanup(stop)
    return port.getHost().port


def agent(case):
    """An Agent over its own persistent pool, closed at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    case.addCleanup(pool.closeCachedConnections)
    return Agent(reactor, pool=pool)


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
        self.addCleanup(registry.stopService)
        return registry

    async def start_relay(self, upstream_url, registry=None, identity=None, **settings):
        """Serve a relay for ``upstream_url``; returns ``(url, registry, identity)``."""
        settings = Settings(upstream=upstream_url, client_id_secrets=settings.pop("secrets", (SECRET,)), **settings)
        registry = self.make_registry() if registry is None else registry
        identity = RelayIdentity.generate() if identity is None else identity
        site = build_site(settings, reactor, agent(self), registry, identity)
        return f"http://127.0.0.1:{await serve(self, site)}", registry, identity

    def client(self, relay_url, **kwargs):
        return Client(relay_url, agent(self), reactor, **kwargs)
