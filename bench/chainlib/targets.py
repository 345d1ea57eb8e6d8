"""
What wrk can be pointed at: the control (the upstream itself), the plain two-hop proxy chain and the relay chain.

Each is an ``IChain``: ``start`` launches its processes in front of the upstream and answers the ``Endpoint`` to load.
"""

import secrets
import sys
from pathlib import Path

import attrs
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from zope.interface import Attribute, Interface, implementer

from bench.chainlib.procs import start_listening

#: The path every request uses; the upstream answers any path, the chains forward it unchanged.
PATH = "/bench"
#: The twistd plugin name of the relay (``twistd mterelay ...``).
RELAY_TAP = "mterelay"


class ChainUnavailable(Exception):
    """The chain cannot be started on this checkout (for instance the relay has not landed); the message says why."""


@attrs.frozen
class Endpoint:
    """Where wrk sends its POSTs, with the extra headers each request carries (they may hold a token: no repr)."""

    url: str
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)


class IChain(Interface):
    """Something between wrk and the upstream whose cost the benchmark measures."""

    name = Attribute("Short label used in the tables, the JSON file and the chart.")

    async def start(reactor, supervisor, upstream_url):
        """
        Start the chain's processes in front of ``upstream_url`` (``http://127.0.0.1:PORT``); a coroutine.

        Answers the ``Endpoint`` to load; raises ``ChainUnavailable`` or ``procs.StartError``.
        """


@implementer(IChain)
@attrs.frozen
class Control:
    """No chain: the application talks to the upstream directly."""

    name: str = "control"

    async def start(self, reactor, supervisor, upstream_url):
        return Endpoint(upstream_url + PATH)


def python_module(module, *arguments):
    """argv running one of the harness's own modules with this interpreter."""
    return [sys.executable, "-m", module, *arguments]


@implementer(IChain)
@attrs.frozen
class ProxyChain:
    """
    Two plain treq proxy hops (``bench.chainlib.proxy``), the second in front of the upstream; ``tuned``: with the
    relay's collector settings and cached endpoints.
    """

    name: str = "proxy"
    tuned: bool = False

    async def start(self, reactor, supervisor, upstream_url):
        target = upstream_url
        tuning = ["--tuned"] if self.tuned else []
        for hop in ("proxy-2", "proxy-1"):
            listening = await start_listening(
                reactor,
                supervisor,
                f"{self.name}-{hop[-1]}",
                lambda port, target=target: python_module(
                    "bench.chainlib.proxy", "--port", str(port), "--upstream", target, *tuning
                ),
            )
            target = listening.url
        return Endpoint(target + PATH)


def relay_unavailable_reason():
    """Why ``twistd mterelay`` cannot run on this checkout, or None when it can."""
    names = {getattr(maker, "tapname", None) for maker in getPlugins(IServiceMaker)}
    if RELAY_TAP not in names:
        return (
            f"the relay has not landed yet: no twistd plugin named {RELAY_TAP!r} is installed "
            "(expected twisted/plugins/ with an IServiceMaker whose tapname is 'mterelay'); "
            "measure the harness with --chains proxy meanwhile"
        )
    return None


def twistd(*arguments):
    """argv of the relay under twistd, in the foreground, without a pid file (several relays run side by side)."""
    return [str(Path(sys.executable).with_name("twistd")), "--nodaemon", "--pidfile=", RELAY_TAP, *arguments]


@implementer(IChain)
@attrs.frozen
class RelayChain:
    """
    Relay B (inbound, in front of the upstream) then relay A (outbound, which the application calls).

    With ``redis_url`` both use that redis-server, in separate databases (B 0, A 1) so that their keys can never
    collide; without it each keeps its registry in memory.
    """

    registry: str
    redis_url: str | None = None

    @property
    def name(self):
        return f"relay-{self.registry}"

    def _registry_arguments(self, database):
        return [f"--redis-url={self.redis_url}/{database}"] if self.redis_url else []

    async def start(self, reactor, supervisor, upstream_url):
        reason = relay_unavailable_reason()
        if reason:
            raise ChainUnavailable(reason)
        # Fresh secrets per run, passed in the environment (never in argv, which any local user can read).
        token = secrets.token_urlsafe(32)
        relay_b = await start_listening(
            reactor,
            supervisor,
            f"{self.name}-b",
            lambda port: twistd(f"--upstream={upstream_url}", f"--port={port}", *self._registry_arguments(0)),
            extra_env={"CLIENT_ID_SECRET": secrets.token_urlsafe(32)},
        )
        relay_a = await start_listening(
            reactor,
            supervisor,
            f"{self.name}-a",
            lambda port: twistd(
                f"--upstream={upstream_url}",
                f"--port={port}",
                f"--allowed-peers={relay_b.url}",
                *self._registry_arguments(1),
            ),
            extra_env={"CLIENT_ID_SECRET": secrets.token_urlsafe(32), "OUTBOUND_TOKEN": token},
        )
        headers = (("x-mte-outbound-token", token), ("x-mte-upstream", relay_b.url))
        return Endpoint(relay_a.url + PATH, headers)
