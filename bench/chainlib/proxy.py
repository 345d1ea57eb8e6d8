"""
One hop of the plain two-hop proxy chain: the floor cost of two Twisted hops with no encoding.

A twisted.web resource forwards every request to ``--upstream`` over a persistent connection pool and streams the
answer back as it arrives (treq's ``collect``). Two of these in a row are what the relay pair (A then B) is compared
with in saturation mode.

The request goes through a bare ``Agent``, as the relay's own upstream client does (``mterelay.upstream``): treq's
``HTTPClient`` adds cookie, redirect and gzip agents that a proxy must not have, and whose cost would flatter the relay.

``--tuned`` gives the hop what the relay has beyond plain Twisted: its collector settings (``mterelay.gctuning``), its
cached client endpoints (``mterelay.upstream.make_agent``) and its eager-sending TCP connections (``mterelay.eager``),
so that a comparison can leave runtime tuning out of the cost of encoding.

``python -m bench.chainlib.proxy --port P --upstream http://127.0.0.1:U [--timeout 30] [--pool-size 1024] [--tuned]``
"""

import argparse

from treq import collect
from twisted.internet.defer import TimeoutError, ensureDeferred
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.logger import Logger

from bench.chainlib.serving import serve_forever
from mterelay.errors import error_body
from mterelay.gctuning import GCTuningService
from mterelay.upstream import make_agent

log = Logger()

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the ones the client recomputes.
HOP_BY_HOP = frozenset(
    name.encode("ascii")
    for name in (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    )
)


def end_to_end(headers, drop=frozenset()):
    """The raw headers of ``headers`` that a proxy forwards: all but hop-by-hop ones and ``drop``."""
    return [(name, values) for name, values in headers.getAllRawHeaders() if name.lower() not in HOP_BY_HOP | drop]


class ForwardResource(Resource):
    """Forwards any method and path to ``upstream`` + the request's path, streaming the answer back."""

    isLeaf = True

    def __init__(self, agent, upstream, clock, timeout):
        super().__init__()
        self._agent = agent
        self._upstream = upstream.rstrip("/").encode("ascii")
        self._clock = clock
        self._timeout = timeout

    def render(self, request):
        forwarding = ensureDeferred(self._forward(request))
        gone = []

        def client_gone(reason):
            # A client that goes away cancels the upstream exchange instead of leaving it to the timeout.
            gone.append(reason)
            forwarding.cancel()

        request.notifyFinish().addErrback(client_gone)
        forwarding.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    async def _forward(self, request):
        request.content.seek(0)
        # Content-Length is dropped because the body producer declares its own length.
        headers = Headers(dict(end_to_end(request.requestHeaders, drop={b"content-length"})))
        exchange = self._agent.request(
            request.method, self._upstream + request.uri, headers, FileBodyProducer(request.content)
        )
        exchange.addTimeout(self._timeout, self._clock)
        response = await exchange
        request.setResponseCode(response.code)
        # Content-Length is kept so twisted.web streams the body as is instead of re-chunking it.
        for name, values in end_to_end(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        body = collect(response, request.write)
        body.addTimeout(self._timeout, self._clock)
        await body
        request.finish()

    def _failed(self, failure, request, gone):
        if gone:
            # Nobody to answer; the cancellation shows up wrapped in whatever the client was doing, so no logging.
            return
        code = 504 if failure.check(TimeoutError) else 502
        log.warn("forwarding failed with {code}: {error}", code=code, error=failure.getErrorMessage())
        if request.startedWriting:
            # The status line is gone: the only honest signal left is to break the connection.
            request.transport.abortConnection()
            return
        request.setResponseCode(code)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.write(error_body(code))
        request.finish()


class QuietSite(Site):
    """A Site without access log: the floor chain must not pay for per-request formatting."""

    def log(self, request):
        pass


def make_site(reactor, upstream, timeout, pool_size, tuned=False):
    """
    The hop's Site: one persistent pool of up to ``pool_size`` connections to the upstream, and no form parsing (as
    in the relay), so the floor pays for nothing a proxy does not need. ``tuned``: the relay's agent and collector.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    agent = Agent(reactor, pool=pool)
    if tuned:
        agent = make_agent(reactor, pool)
        reactor.callWhenRunning(GCTuningService().startService)
    return QuietSite(ForwardResource(agent, upstream, reactor, timeout), parsePOSTFormSubmission=False)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pool-size", type=int, default=1024)
    parser.add_argument(
        "--tuned", action="store_true", help="the relay's collector settings, cached endpoints and eager sending"
    )
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(argv)
    serve_forever(
        options.port,
        lambda reactor: make_site(reactor, options.upstream, options.timeout, options.pool_size, options.tuned),
        eager=options.tuned,
    )


if __name__ == "__main__":
    main()
