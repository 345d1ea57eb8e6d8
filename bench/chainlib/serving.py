"""What the benchmark's own servers (upstream, proxy hops) share: how they listen, log and run until stopped."""

import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from mterelay.eager import EagerTCPReactor

#: Listen backlog: wrk opens all its connections at once and the kernel's default queue of 50 would drop SYNs.
BACKLOG = 1024


def serve_forever(port, make_factory, eager=False):
    """
    Listen on 127.0.0.1:``port`` with ``make_factory(reactor)`` and run until signalled (the guard's TERM); with
    ``eager``, through the relay's eager-sending TCP (``mterelay.eager``), which ``make_factory`` then gets too.

    Only warnings and errors are logged (to stderr, which the harness sends to a file): per-request logging would be
    a cost the measured chains do not all pay.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])])

    def run(reactor):
        network = EagerTCPReactor(reactor) if eager else reactor
        endpoint = TCP4ServerEndpoint(network, port, backlog=BACKLOG, interface="127.0.0.1")
        listening = endpoint.listen(make_factory(network))
        # Never fires: the process ends when the reactor is stopped by a signal.
        return listening.addCallback(lambda _: Deferred())

    react(run)
