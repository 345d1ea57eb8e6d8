"""
The twistd plugin's ``Options`` and ``makeService``: parse the settings once, then wire services. No logic lives here.
"""

import os
import sys

from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mterelay import config, eager, gctuning, logs, site, upstream, web
from mterelay.codec import RelayIdentity
from mterelay.redis_registry import RedisRegistry
from mterelay.registry import MemoryRegistry

log = Logger()



def _help(option):
    default = "required" if option.default is None else f"default: {option.default}"
    return f"{option.help} [env {option.env}; {default}]"


class Options(usage.Options):
    """
    ``twistd mterelay`` options. Every setting is also read from the environment and the ``--config`` YAML file; an
    invalid configuration prints one line ``mterelay: error: ...`` on stderr and exits with status 2.
    """

    optFlags = [["debug", None, _help(next(o for o in config.OPTIONS if o.field == "debug"))]]
    optParameters = [["config", "c", None, "YAML file of settings (keys as in the product documents)"]] + [
        [option.flag, None, None, _help(option)] for option in config.OPTIONS if option.field not in ("debug", "listen")
    ]

    def __init__(self, environ=None, stderr=None, reactor=None):
        super().__init__()
        self["listen"] = []
        self._environ = os.environ if environ is None else environ
        #: Where one-line errors go (also those of listening, once twistd starts the services).
        self.stderr = sys.stderr if stderr is None else stderr
        self._reactor = reactor
        self._network = None
        self.settings = None
        self.identity = None
        self.warnings = []

    def __repr__(self):
        # The parsed command line holds CLIENT_ID_SECRET and OUTBOUND_TOKEN when given as flags: names only.
        return f"<mterelay Options: {' '.join(sorted(name for name, value in self.items() if value))}>"

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # An unknown option or a flag given a value: one line and status 2, as for any invalid setting (twistd
            # would print the whole usage text and exit 1, which systemd restarts).
            self.stderr.write(f"mterelay: error: {e} (twistd mterelay --help lists the options)\n")
            self.stderr.flush()
            raise SystemExit(2)

    def opt_listen(self, endpoint):
        self["listen"].append(endpoint)

    opt_listen.__doc__ = _help(next(o for o in config.OPTIONS if o.field == "listen"))

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def network(self):
        """The reactor the relay listens and connects through: ``reactor`` with eager-sending TCP connections."""
        if self._network is None:
            self._network = eager.EagerTCPReactor(self.reactor)
        return self._network

    def postOptions(self):
        flags = {option.field: self.get(option.flag) for option in config.OPTIONS}
        flags["debug"] = True if self["debug"] else None
        checks = {"listen": self._check_endpoints, "identity_key": self._load_identity}
        try:
            self.settings, warnings = config.load(flags, self._environ, self["config"], checks)
        except config.ConfigError as e:
            # twistd would print the whole usage text for a UsageError; the operator needs one line.
            self.stderr.write(f"mterelay: error: {e}\n")
            self.stderr.flush()
            raise SystemExit(2)
        if self.identity is None:
            self.identity = RelayIdentity.generate()  # config.load has warned about it
        self.warnings = warnings

    def _load_identity(self, path):
        """Load IDENTITY_KEY into ``identity``; a check for ``config.load``, whose errors name where it came from."""
        try:
            self.identity = site.load_identity(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load {path!r}: {e}") from None

    def _check_endpoints(self, descriptions):
        """Parse the LISTEN endpoints (PORT's own need no check); a check for ``config.load``."""
        for description in descriptions:
            try:
                port = _tcp_port(serverFromString(self.network, description))
                if port is not None and not 0 <= port <= 65535:
                    # The parsers take any integer: listening on it would kill twistd with an OverflowError traceback.
                    raise ValueError(f"port {port} is not 0-65535")
            except Exception as e:  # endpoint parsers raise anything from ValueError to OpenSSL errors
                raise ValueError(f"invalid endpoint {description!r}: {e}") from None


def _tcp_port(endpoint):
    """
    The TCP port a parsed server endpoint listens on, or None. Twisted keeps it private: ``_port`` on its TCP and SSL
    endpoints, which its wrappers hold as ``_wrappedEndpoint`` (``haproxy:``) or ``endpoint`` (``tls:``).
    """
    while (inner := getattr(endpoint, "_wrappedEndpoint", None) or getattr(endpoint, "endpoint", None)) is not None:
        endpoint = inner
    return getattr(endpoint, "_port", None)


def _registry(settings, reactor):
    """The session registry: Redis when REDIS_URL is set, else memory (both are services: sweep, connection)."""
    limits = {
        "pair_ttl": settings.pair_ttl,
        "max_pairs_per_client": settings.max_pairs_per_client,
        "max_pairs_total": settings.max_pairs,
    }
    if settings.redis_url is None:
        return MemoryRegistry(reactor, **limits)
    return RedisRegistry.from_url(settings.redis_url, reactor, reactor, timeout=settings.redis_timeout, **limits)


def makeService(options):
    """Wire the relay: one listening service per endpoint, a connection pool for UPSTREAM and one for peer relays,
    draining on stop."""
    settings, reactor = options.settings, options.reactor
    out = logs.output_for(getattr(options, "parent", None))
    top = logs.LoggingService(logs.make_observer(settings.log_format, settings.debug, out))
    for warning in options.warnings:
        log.warn("{text}", text=warning)
    pool = upstream.make_pool(reactor)
    # A peer relay takes each sealed message once: Twisted's resend of a bodiless one whose kept-alive connection
    # broke would be refused as a replay (563) whenever the first got through, so the break is reported instead.
    peers = upstream.make_pool(reactor, resend=False)
    gctuning.GCTuningService().setServiceParent(top)
    # The registry stops only once the relay has drained: in-flight requests still read and write it.
    lifetime = web.StopInOrder()
    lifetime.setServiceParent(top)
    registry = _registry(settings, reactor)
    registry.setServiceParent(lifetime)
    tracker = web.InFlight(reactor)
    # Upstream and peer connections share the listening side's eager sending (see mterelay.eager).
    agent = upstream.make_agent(options.network, pool)
    peer_agent = upstream.make_agent(options.network, peers)
    relay_site = site.build_site(settings, reactor, agent, registry, options.identity, tracker, peer_agent=peer_agent)
    relay = web.DrainingService(
        tracker,
        settings.drain_timeout,
        lambda: gatherResults([pool.closeCachedConnections(), peers.closeCachedConnections()]),
        relay_site,
        web.StopSignals(reactor),
    )
    for description in settings.listen:
        web.ListeningService(description, relay_site, options.network, options.stderr).setServiceParent(relay)
    relay.setServiceParent(lifetime)
    log.info("relay identity {identity} (what clients pass as --pin, peers put in PEER_PINS)",
             identity=options.identity.public_b64())
    log.info(
        "mterelay serving {listen} for upstream {upstream}",
        listen=",".join(settings.listen),
        upstream=config.loggable_url(settings.upstream),
    )
    return top
