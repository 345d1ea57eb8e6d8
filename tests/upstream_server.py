"""
A real twisted.web upstream for integration tests, listening on 127.0.0.1 port 0.

``serve_relay`` runs an mterelay site in this process (for tests of the router and the roles behind it).

Usage::

    upstream = UpstreamServer(reactor)
    yield upstream.start()          # upstream.url == "http://127.0.0.1:<port>"
    self.addCleanup(upstream.stop)
    ...
    upstream.last.body_sha256       # what it received

Paths (anything else behaves like ``/echo``):

``/echo/...``
    200 with a JSON summary of the request: method, path, query, headers (name -> list of values), body_sha256,
    body_length. Bodies are read in chunks, never held whole.
``/status/<code>``
    Answers ``code`` (no body for 204 and 304), with the JSON summary otherwise; ``?phrase=<text>`` sets the reason
    phrase.
``/cookies/<n>``
    200 with ``n`` Set-Cookie headers ``c<i>=v<i>; Path=/``; ``?pad=<k>`` adds ``k`` bytes to each value.
``/redirect?to=<url>``
    302 to ``url``.
``/bytes/<n>``
    ``n`` bytes of ``pattern()`` streamed with backpressure; ``?chunked=1`` omits Content-Length.
``/untyped``
    200 with an HTML-looking body and no Content-Type.
``/stall/<n>``
    Announces ``2n`` body bytes, sends ``n`` and then nothing; a client that gives up counts in ``abandoned``.
``/slow/<seconds>``
    The JSON summary after ``seconds`` on the server's clock; a client that gives up first counts in ``abandoned``.
"""

import hashlib
import json
from urllib.parse import parse_qs

import attrs
from twisted.internet.defer import gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

PATTERN = bytes(range(256)) * 256
CHUNK = 64 * 1024


def pattern(length):
    """The first ``length`` bytes that ``/bytes/<length>`` sends (computed in memory: keep it small)."""
    return (PATTERN * (length // len(PATTERN) + 1))[:length]


def pattern_sha256(length):
    """The sha256 hex digest of ``/bytes/<length>``'s body, computed in bounded memory."""
    digest = hashlib.sha256()
    for offset in range(0, length, len(PATTERN)):
        digest.update(PATTERN[: min(len(PATTERN), length - offset)])
    return digest.hexdigest()


@attrs.frozen
class Received:
    """What the upstream received for one request."""

    method: str
    path: str
    query: str
    headers: Headers
    body_sha256: str
    body_length: int

    def summary(self):
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": {
                name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                for name, values in self.headers.getAllRawHeaders()
            },
            "body_sha256": self.body_sha256,
            "body_length": self.body_length,
        }


def _receive(request):
    digest = hashlib.sha256()
    length = 0
    request.content.seek(0)
    while chunk := request.content.read(CHUNK):
        digest.update(chunk)
        length += len(chunk)
    path, _, query = request.uri.decode("latin-1").partition("?")
    return Received(request.method.decode("ascii"), path, query, request.requestHeaders.copy(), digest.hexdigest(), length)


class _PatternProducer:
    """A pull producer writing ``remaining`` pattern bytes, one chunk each time the transport asks."""

    def __init__(self, request, remaining):
        self._request = request
        self._remaining = remaining
        self._offset = 0

    def resumeProducing(self):
        if not self._remaining:
            self._request.unregisterProducer()
            self._request.finish()
            return
        size = min(CHUNK, self._remaining)
        start = self._offset % len(PATTERN)
        self._request.write((PATTERN + PATTERN)[start : start + size])
        self._offset += size
        self._remaining -= size

    def stopProducing(self):
        self._remaining = 0


class _Upstream(Resource):
    isLeaf = True

    def __init__(self, owner):
        super().__init__()
        self._owner = owner

    def render(self, request):
        received = _receive(request)
        self._owner.received.append(received)
        parts = received.path.strip("/").split("/")
        route, argument = parts[0], (parts[1] if len(parts) > 1 else "")
        query = parse_qs(received.query)
        request.setHeader(b"x-upstream", b"test")
        # Not what a relay would set itself, so that a test sees whose they are.
        request.setHeader(b"server", b"mterelay-test-upstream")
        request.setHeader(b"date", b"Tue, 01 Jan 2030 00:00:00 GMT")
        if route == "status":
            request.setResponseCode(int(argument), *(phrase.encode() for phrase in query.get("phrase", [])[-1:]))
            if int(argument) in (204, 304):
                return b""
        elif route == "cookies":
            pad = "x" * int(query.get("pad", ["0"])[0])
            request.responseHeaders.setRawHeaders(
                b"set-cookie", [f"c{i}=v{i}{pad}; Path=/".encode() for i in range(int(argument))]
            )
        elif route == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", query["to"][0].encode())
            return b""
        elif route == "bytes":
            length = int(argument)
            if "chunked" not in query:
                request.setHeader(b"content-length", b"%d" % (length,))
            request.setHeader(b"content-type", b"application/octet-stream")
            request.registerProducer(_PatternProducer(request, length), False)
            return server.NOT_DONE_YET
        elif route == "slow":
            call = self._owner.clock.callLater(float(argument), self._answer, request, received)
            request.notifyFinish().addErrback(self._abandoned, call)
            return server.NOT_DONE_YET
        elif route == "control":
            # A header whose value holds a control character, which no header block may carry.
            request.responseHeaders.setRawHeaders(b"x-secret-" + argument.encode(), [b"a\x01b"])
        elif route == "untyped":
            # A body without Content-Type (twisted.web would label it text/html).
            request.defaultContentType = None
            return b"<b>not a page</b>"
        elif route == "events":
            # An event stream without Content-Length: its first event at once (with ``quiet``: only its head), the
            # rest as the test writes them to ``streams`` (and finishes it).
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"" if "quiet" in query else b"data: 0\n\n")
            self._owner.streams.append(request)
            return server.NOT_DONE_YET
        elif route == "stall":
            # Promise a body, send its first ``argument`` bytes, then nothing until the client gives up.
            request.setHeader(b"content-length", b"%d" % (int(argument) * 2,))
            request.write(pattern(int(argument)))
            request.notifyFinish().addErrback(lambda _: setattr(self._owner, "abandoned", self._owner.abandoned + 1))
            return server.NOT_DONE_YET
        return self._summary(request, received)

    def _summary(self, request, received):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(received.summary()).encode()

    def _abandoned(self, _, call):
        call.cancel()
        self._owner.abandoned += 1

    def _answer(self, request, received):
        request.write(self._summary(request, received))
        request.finish()


class UpstreamServer:
    """A real HTTP upstream on 127.0.0.1 that records what it receives (``received``, newest last)."""

    def __init__(self, reactor, clock=None):
        self._reactor = reactor
        self.clock = reactor if clock is None else clock
        self.received = []
        #: How many slow requests their client gave up on.
        self.abandoned = 0
        #: The open ``/events`` answers, oldest first.
        self.streams = []
        self.url = None
        self._port = None

    @property
    def last(self):
        """The most recent request received."""
        return self.received[-1]

    def start(self):
        """Listen on a free port; the Deferred fires with this server once ``url`` is set."""
        site = server.Site(_Upstream(self))
        site.noisy = False
        d = TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(site)

        def listening(port):
            self._port = port
            self.url = f"http://127.0.0.1:{port.getHost().port}"
            return self

        return d.addCallback(listening)

    def stop(self):
        """Stop listening (idempotent)."""
        port, self._port = self._port, None
        return port.stopListening() if port is not None else succeed(None)



@attrs.frozen
class RelayUnderTest:
    """An mterelay site listening on 127.0.0.1 in this process."""

    url: str
    tracker: object
    port: object
    pools: tuple

    def stop(self):
        """Stop listening and close the relay's upstream and peer connections."""
        return self.port.stopListening().addCallback(
            lambda _: gatherResults([pool.closeCachedConnections() for pool in self.pools])
        )


def serve_relay(reactor, settings):
    """
    Serve the relay for ``settings`` (``mterelay.config.Settings``) on a free port, the way ``makeService`` wires it
    (memory registry, an ephemeral identity).

    @return: a Deferred firing with a ``RelayUnderTest``; stop it in a cleanup.
    """
    from mterelay.codec import RelayIdentity
    from mterelay.eager import EagerTCPReactor
    from mterelay.registry import MemoryRegistry
    from mterelay.site import build_site
    from mterelay.upstream import make_agent, make_pool
    from mterelay.web import InFlight

    pool, peers = make_pool(reactor), make_pool(reactor, resend=False)
    tracker = InFlight(reactor)
    network = EagerTCPReactor(reactor)
    site = build_site(
        settings,
        reactor,
        make_agent(network, pool),
        MemoryRegistry(reactor),
        RelayIdentity.generate(),
        tracker,
        peer_agent=make_agent(network, peers),
    )
    d = TCP4ServerEndpoint(network, 0, interface="127.0.0.1").listen(site)
    return d.addCallback(
        lambda port: RelayUnderTest(f"http://127.0.0.1:{port.getHost().port}", tracker, port, (pool, peers))
    )
