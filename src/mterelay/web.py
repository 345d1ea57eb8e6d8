"""
The relay's HTTP face: a router resource that answers echo, the error table and CORS preflights itself, and hands
everything else to the outbound role, the inbound relay or the pass-through proxy.

Dispatch order: CORS preflight; ``/api/mte-echo[/<msg>]``; ``/api/mte-errors``; a request carrying
``x-mte-outbound-token`` or ``x-mte-upstream`` (outbound handler, only when the token matches OUTBOUND_TOKEN, 401
otherwise); ``/api/mte-relay`` and ``/api/mte-pair`` (inbound handler); a request carrying ``x-mte-relay`` (inbound
handler, which matches MTE_ROUTES against the decoded path); PASS_THROUGH_ROUTES (proxied as is); MTE routes
(MTE_ROUTES, or every other path when unset; inbound handler); else 404. A handler is an object with
``render(request)`` returning bytes or ``NOT_DONE_YET``; an absent handler answers 501. The inbound one may also
refuse a message on its head, before its body is read: at once (``head_refusal(headers, header)``: a ``RelayError``
or None), or once its pair was looked up (``pair_lookup(header)``: a Deferred of the pair's record, failing with the
refusal).
"""

import errno
import functools
import hmac
import json
import re
import signal
import sys
from urllib.parse import unquote

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, race, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger, LogLevel
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from mterelay import logs
from mterelay.codec import CLIENT_ID_HEADER, ENCODED_HEADERS, IDENTITY_HEADER, RELAY_HEADER, RelayHeader
from mterelay.errors import RelayError, error_table
from mterelay.upstream import forward, upstream_headers

log = Logger()

ECHO = "/api/mte-echo"
ERRORS = "/api/mte-errors"
PAIR_PATH = "/api/mte-pair"
HELLO_PATH = "/api/mte-relay"
INBOUND_PATHS = (HELLO_PATH, PAIR_PATH)
#: The largest pair request body (JSON with up to a few dozen public keys).
MAX_PAIR_BODY = 64 * 1024
#: An origin-form request target (RFC 9112 3.2.1) of RFC 3986 characters: what an encoded URL may hold, since
#: nothing else is sent upstream.
ORIGIN_FORM = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*)?")
OUTBOUND_TOKEN_HEADER = b"x-mte-outbound-token"
UPSTREAM_HEADER = b"x-mte-upstream"
#: Seconds a client connection may stay silent while the relay reads from it (Twisted's default is 12 hours); the
#: clock stops while the relay works on a request.
CLIENT_IDLE_TIMEOUT = 60
#: Seconds a request's whole head may take to arrive, from its first byte.
HEAD_TIMEOUT = 20
#: A request body must keep coming: BODY_TIMEOUT seconds for its first bytes, then one more second per BODY_MIN_RATE
#: bytes received (Apache mod_reqtimeout's rule, its default rate), at most BODY_TIMEOUT seconds ahead.
BODY_TIMEOUT = 20
BODY_MIN_RATE = 500
#: Relay headers a browser client must be able to send and read.
MTE_HEADERS = (RELAY_HEADER, ENCODED_HEADERS, CLIENT_ID_HEADER, IDENTITY_HEADER)
CORS_ALLOW_HEADERS = b", ".join(
    (b"content-type", b"accept", b"authorization", b"x-requested-with", logs.REQUEST_ID_HEADER) + MTE_HEADERS
)
CORS_EXPOSE_HEADERS = b", ".join(MTE_HEADERS + (logs.REQUEST_ID_HEADER,))
CORS_MAX_AGE = b"600"


def compile_routes(patterns):
    """One regular expression matching a whole path against route patterns where ``*`` matches anything."""
    if not patterns:
        return None
    alternatives = "|".join(".*".join(map(re.escape, pattern.split("*"))) for pattern in patterns)
    return re.compile(f"(?:{alternatives})")


def names_outbound(headers):
    """
    Whether a request with ``headers`` is for the outbound role: it carries the outbound token or names a peer relay
    (a request naming a peer without the token is refused with 401, not taken for an inbound or pass-through one).
    """
    return headers.hasHeader(OUTBOUND_TOKEN_HEADER) or headers.hasHeader(UPSTREAM_HEADER)


def relay_header(request):
    """
    ``request``'s ``x-mte-relay``, parsed (``CodecError`` when malformed, 569 when missing): as ``Router.routed``
    parsed it on the head, or parsed here (a unit test's request has no head).
    """
    routed = getattr(request, "routed", None)
    if isinstance(routed, tuple) and routed[2] is not None:
        return routed[2]
    raw = request.getHeader(RELAY_HEADER)
    if raw is None:
        raise RelayError(569, "x-mte-relay header is missing")
    return RelayHeader.parse(raw)


def _json(request, code, payload, phrase=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(code, phrase)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    return body


def error_response(request, error):
    """
    Set ``request``'s status and headers for the ``RelayError`` and return its JSON body (for ``render``). The
    headers are the relay's own (CORS, HEADERS, request id) as the router set them: none that an upstream or peer
    answer had already brought in before the failure.
    """
    own = getattr(request, "own_headers", None)
    if own is not None:
        request.responseHeaders = own.copy()
    return _json(request, error.code, error.body(), error.entry.name.encode("ascii"))


def send_error(request, error):
    """Answer ``request`` (rendered asynchronously) with the ``RelayError``."""
    request.write(error_response(request, error))
    request.finish()


class InFlight:
    """Counts requests being answered so that stopping can wait for them, up to a bound."""

    def __init__(self, clock):
        self.clock = clock
        self._count = 0
        self._idle = []

    def __len__(self):
        return self._count

    def track(self, request):
        self._count += 1
        request.notifyFinish().addBoth(self._done)

    def _done(self, _):
        self._count -= 1
        if not self._count:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(True)

    def wait(self, timeout):
        """A Deferred firing with True when no request is in flight, or with False after ``timeout`` seconds."""
        if not self._count:
            return succeed(True)
        waiting = Deferred()
        self._idle.append(waiting)
        waiting.addTimeout(timeout, self.clock, onTimeoutCancel=lambda *_: False)
        return waiting


#: Seconds the drained connections have at least to send the last answers, past DRAIN_TIMEOUT if need be.
FLUSH_GRACE = 1.0


class StopSignals:
    """
    Stop signals once the relay is stopping. The reactor's own handlers would stop the stopping reactor once more and
    log a ReactorNotRunning traceback; from the reactor's start they are wrapped so that the first stop signal still
    goes to them, and later ones do what a drain needs: another SIGTERM (a process manager, or a kill of a whole
    process group, may send several) is only logged; a SIGINT (a second Ctrl-C) breaks the drain off. A handler the
    reactor did not install (a debugger's, or SIGINT ignored under a shell) is left alone.
    """

    def __init__(self, reactor, signals=signal):
        self._reactor = reactor
        self._signals = signals
        #: Set by the first stop signal, or by the relay when it starts to stop for any other reason.
        self.stopping = False

    def watch(self, hurry, count):
        """Once the reactor runs (it installs its handlers as it starts): on SIGINT ``hurry()``, on SIGTERM log
        ``count()`` (requests in flight), both in the reactor thread, once the relay is stopping."""

        def noted():
            log.info("SIGTERM while stopping: already draining, {count} requests in flight", count=count())

        self._reactor.callWhenRunning(self._wrap, ((self._signals.SIGTERM, "sigTerm", noted),
                                                   (self._signals.SIGINT, "sigInt", hurry)))

    def _wrap(self, wrapped):
        reactor, signals = self._reactor, self._signals
        for number, own, later in wrapped:
            first = signals.getsignal(number)
            if first == getattr(reactor, own, None):
                signals.signal(number, functools.partial(self._handle, first, later))

    def _handle(self, first, later, number, frame):
        if not self.stopping:
            self.stopping = True
            first(number, frame)
        else:
            # A signal handler may only hand work over: the reactor runs it between two events.
            self._reactor.callFromThread(later)


class DrainingService(MultiService):
    """
    Stops listening first, then has ``site`` (a ``RelaySite``, when given) take no further request on its open
    connections, and lets in-flight requests finish for up to ``drain_timeout`` seconds, or until ``hurry``.
    ``stop_signals`` (a ``StopSignals``, when given) has further stop signals hurry the drain or be logged.
    """

    def __init__(self, tracker, drain_timeout, on_stopped=None, site=None, stop_signals=None):
        super().__init__()
        self._tracker = tracker
        self._drain_timeout = drain_timeout
        self._on_stopped = on_stopped
        self._site = site
        self._stop_signals = stop_signals
        self._hurried = None

    def startService(self):
        super().startService()
        if self._stop_signals is not None:
            self._stop_signals.watch(self.hurry, lambda: len(self._tracker))

    def hurry(self):
        """End a drain under way at once: the requests still in flight are broken off (their clients see a reset)."""
        if self._hurried is not None and not self._hurried.called:
            log.warn("drain broken off with {count} requests in flight", count=len(self._tracker))
            self._hurried.callback(False)

    def _unless_hurried(self, waiting):
        """``waiting``'s result (True: done), or False as soon as ``hurry`` is called."""
        self._hurried = Deferred()
        return race([waiting, self._hurried]).addCallback(lambda winner: winner[1])

    def stopService(self):
        if self._stop_signals is not None:
            self._stop_signals.stopping = True
        stopping = super().stopService()

        clock = self._tracker.clock
        deadline = []

        def drain(_):
            deadline.append(clock.seconds() + self._drain_timeout)
            if self._site is not None:
                self._site.drain()
            log.info("draining {count} in-flight requests", count=len(self._tracker))
            return self._unless_hurried(self._tracker.wait(self._drain_timeout)).addCallback(flushed)

        def flushed(complete):
            # Every request is answered, but its last bytes may still wait in a connection's buffer: the drained
            # connections close once they sent them, within what is left of DRAIN_TIMEOUT but FLUSH_GRACE at least
            # (an answer finished at the deadline still goes out), and never longer than DRAIN_TIMEOUT (the wall
            # clock may have gone back).
            if not complete or self._site is None:
                return complete
            wait = min(self._drain_timeout, max(FLUSH_GRACE, deadline[0] - clock.seconds()))
            return self._unless_hurried(self._site.closed(wait))

        def drained(complete):
            if not complete:
                log.warn("stopped with {count} requests still in flight", count=len(self._tracker))
                if self._site is not None:
                    return self._site.break_off()

        def stopped(_):
            if self._on_stopped is not None:
                return self._on_stopped()

        return stopping.addCallback(drain).addCallback(drained).addCallback(stopped)


class ListenFailed(SystemExit, Exception):
    """
    A port could not be listened on (the text says why). A ``SystemExit``, so that ``twistd --nodaemon`` exits with
    ``code`` and no traceback; also an ``Exception``, the only kind a daemonizing twistd hands to the process that
    launched it (which otherwise waits for its child's word for ever).
    """

    def __init__(self, code, reason):
        super().__init__(code)
        self.reason = reason

    def __str__(self):
        return self.reason


class ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint (``description``) and, when it cannot, stops twistd with one line on ``stderr``: status 1
    for an address in use (it may free up: systemd restarts the relay), 2 for anything else (an address that is not
    this host's, a missing socket directory, a privileged port), which only the configuration can fix.
    """

    def __init__(self, description, factory, reactor, stderr=None):
        super().__init__(serverFromString(reactor, description), factory)
        # Raised on start, so that twistd never runs without one of its ports.
        self._raiseSynchronously = True
        self.description = description
        self._stderr = sys.stderr if stderr is None else stderr

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:  # a unix: endpoint's lock file fails with a bare OSError
            reason = getattr(e, "socketError", e)
            self._stderr.write(f"mterelay: error: cannot listen on {self.description!r}: {reason}\n")
            self._stderr.flush()
            # The cause first: a daemonizing twistd passes on only the first 100 bytes.
            code = 1 if getattr(reason, "errno", None) == errno.EADDRINUSE else 2
            raise ListenFailed(code, f"{reason} (listening on {self.description!r})") from None


class StopInOrder(MultiService):
    """
    Starts its children in the order they were added and stops them one at a time in reverse, each once the one added
    after it has stopped: the relay drains its in-flight requests before the registry they use disconnects.
    """

    def stopService(self):
        Service.stopService(self)
        stopping = succeed(None)
        for child in reversed(list(self)):
            stopping.addCallback(lambda _, child=child: child.stopService())
            stopping.addErrback(lambda failure, c=child: log.failure("{child} failed to stop", failure, child=c))
        return stopping


class RelayRequest(server.Request):
    """
    A request that refuses a body over the limit its head sets (``Router.body_limit``: MAX_BODY_SIZE, 413, for most)
    as soon as its size or its chunks show it, answers the target ``*`` (but for OPTIONS) with the relay's JSON 400
    rather than twisted.web's bare 405, and labels no answer ``text/html`` that its upstream did not label so (a
    browser would render an untyped body as a page).
    """

    defaultContentType = None
    #: Set by the router under DEBUG, logged with the request.
    request_id = None
    #: The relay's own response headers, set by the router before a handler runs (see ``error_response``).
    own_headers = None
    _received = 0
    _refused = False
    #: ``Router.routed`` of this request, the body limit and the error that answers a body over it (set once the
    #: head is in).
    routed = None
    _limit = None
    _over = None

    #: The inbound role's lookup of the pair a message with a body names, started on its head (``Router.pair_lookup``).
    pair_lookup = None

    def gotLength(self, length):
        router = self.channel.site.resource
        # The request target is only the channel's until the whole request is in.
        self.routed = router.routed(self.channel._path, self.requestHeaders)
        self._limit, self._over = router.body_limit(self.routed, self.requestHeaders)
        if length is not None and length > self._limit:
            self._refuse()
            return
        super().gotLength(length)
        if length != 0:
            self._look_up_pair(router)

    def _look_up_pair(self, router):
        """
        Look the message's pair up before its body is read: a pair this relay does not hold (anyone may name one, with
        a client id anyone may have) is refused on the head, not after taking in up to MAX_BODY_SIZE. Until the
        registry answers the connection reads nothing, and a client that asked (``Expect: 100-continue``) is told to
        send its body only once the pair is known.
        """
        lookup = router.pair_lookup(self.routed)
        if lookup is None:
            return
        channel = self.channel
        waiting = {"answered": False, "paused": False, "continue": False}

        def settled(failure):
            # The refusal becomes the outcome: the inbound role raises it, or nobody needs to (refused here).
            failure.trap(RelayError)
            return failure.value

        def looked_up(outcome):
            waiting["answered"] = True
            if self.channel is None or self._refused or channel._handlingRequest:
                # Gone, refused already, or the whole request came in before the lookup stopped reading.
                return outcome
            if isinstance(outcome, RelayError):
                # Answered on the head; nothing more is read.
                self._over, self._limit = outcome, 0
                self._refuse()
                return outcome
            if waiting["continue"]:
                channel._send100Continue()
            if waiting["paused"] and not channel._waitingForTransport:
                channel._networkProducer.resumeProducing()
            return outcome

        self.pair_lookup = lookup.addErrback(settled)
        # Whatever the outcome (an unexpected failure too, which the inbound role answers), reading goes on. A
        # Deferred can have been called and still wait on another (a Redis reply): only this callback says.
        lookup.addBoth(looked_up)
        if not waiting["answered"]:
            waiting["paused"] = True
            channel._networkProducer.pauseProducing()
            expect = self.requestHeaders.getRawHeaders(b"expect", [b""])[0].lower()
            if expect == b"100-continue" and channel._version == b"HTTP/1.1":
                # twisted.web would send "100 Continue" as soon as this returns: only once the pair is known.
                self.requestHeaders.removeHeader(b"expect")
                waiting["continue"] = True

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse()
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def process(self):
        if self.path == b"*" and self.method != b"OPTIONS":
            _set_headers(self, self.channel.site.headers)
            self.write(error_response(self, RelayError(400, "the request target * is for OPTIONS only")))
            self.finish()
            return
        super().process()

    def _refuse(self):
        # The body is never read: answer at once and close, so the client stops sending. No "100 Continue" either.
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")
        # With the relay's own headers (CORS above all: a browser could not read the refusal without them), and
        # logged as any other answer.
        self.channel.site.resource.set_own_headers(self)
        self.setResponseCode(self._over.code)
        self.sentLength = self.channel.answer_and_close(self._over, self.responseHeaders)
        # Only the channel has the request line yet (requestReceived never comes for a refused request).
        self.method, self.uri = self.channel._command, self.channel._path
        self.path = self.uri.split(b"?", 1)[0]
        self.channel.site.log(self)


@implementer(IHalfCloseableProtocol)
class RelayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel whose refusals of malformed requests are the relay's short JSON errors: 431 for a request
    line or head over Twisted's 16 KiB, 400 for anything else that is not well-formed HTTP/1.1 (bad request line,
    header, Content-Length or chunked framing). Twisted itself answers a bare status line, or closes the connection.

    A request's head must arrive whole within ``site.head_timeout`` seconds of its first byte, and its body at
    ``site.body_min_rate`` bytes a second or faster (408 otherwise): Twisted's idle timeout starts again at every
    byte, so a client sending one header line or a few body bytes at a time could hold a connection for ever, and a
    body that stops coming was closed without an answer.

    A client that half-closes once its request is complete (it has nothing more to send) is answered before the
    connection closes; Twisted would take the half-close for the client going away and drop the request.
    """

    _head_timer = None
    _body_timer = None
    #: Set once the channel answered and closed on its own: a TLS connection still delivers data until the client
    #: acknowledges the close, and a request completed by it must not be processed after its refusal.
    _closing = False
    #: Body bytes received since the body timer was last set.
    _body_bytes = 0

    def readConnectionLost(self):
        if self._handlingRequest:
            # Answer the request in hand, then close (Twisted closes a connection that is not persistent).
            self.persistent = False
        else:
            # Mid-head or mid-body: the request can never be complete, so it is not timed either.
            self._stop_timers()
            self.loseConnection()

    def writeConnectionLost(self):
        self.loseConnection()

    def dataReceived(self, data):
        if self._closing:
            return
        if self._head_timer is None and self.line_mode and not self._handlingRequest:
            self._head_timer = self.callLater(self.site.head_timeout, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._head_timer = _cancel(self._head_timer)
        super().allHeadersReceived()
        # A body is due unless there is none or the request was refused on its head (``Router.body_limit``).
        if self.length != 0 and not self.transport.disconnecting:
            self._body_bytes = 0
            self._body_timer = self.callLater(self.site.body_timeout, self._body_check)

    def rawDataReceived(self, data):
        self._body_bytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self):
        self._body_timer = _cancel(self._body_timer)
        super().allContentReceived()

    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.forget(self)
        self._stop_timers()
        super().connectionLost(reason)

    def checkPersistence(self, request, version):
        if self.site.draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def drain(self):
        """
        Take no further request: an idle connection closes now; one with a request in hand closes once it was
        answered (with ``Connection: close``, which ``checkPersistence`` adds to a request still arriving).
        """
        if not self.requests:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def answer_and_close(self, error, headers=None):
        """
        Answer ``error`` straight on the connection, then close it: for refusals made before (or instead of) reading a
        whole request, when there is no request to answer through. Nothing else is timed or answered after it. The
        answer carries ``headers`` (a ``Headers``, the relay's own for the request) or else HEADERS; returns the
        size of its body.
        """
        self._closing = True
        self._stop_timers()
        body = error.body()
        # The error's name as its phrase, as on the relay's other error answers (error_response).
        head = [b"HTTP/1.1 %d %s" % (error.code, error.entry.name.encode("ascii")), b"Content-Type: application/json"]
        head += [b"Connection: close", b"Content-Length: %d" % (len(body),)]
        if headers is None:
            head += [b"%s: %s" % (n.encode("latin-1"), v.encode("latin-1")) for n, v in self.site.headers]
        else:
            head += [name + b": " + value for name, values in headers.getAllRawHeaders() for value in values]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.loseConnection()
        return len(body)

    def _stop_timers(self):
        self._head_timer = _cancel(self._head_timer)
        self._body_timer = _cancel(self._body_timer)

    def _head_too_slow(self):
        self._head_timer = None
        self.answer_and_close(RelayError(408, f"the request's head did not arrive within {self.site.head_timeout} s"))

    def _body_check(self):
        # The bytes of the last period buy the next one; a body slower than the minimum rate runs out of time.
        credit = min(self._body_bytes / self.site.body_min_rate, self.site.body_timeout)
        self._body_bytes = 0
        if credit >= 1:
            self._body_timer = self.callLater(credit, self._body_check)
            return
        self._body_timer = None
        rate = self.site.body_min_rate
        self.answer_and_close(RelayError(408, f"the request's body came slower than {rate} bytes a second"))

    def lineLengthExceeded(self, line):
        self.answer_and_close(RelayError(431, f"a request line or header is longer than {self.MAX_LENGTH} bytes"))

    def _respondToBadRequestAndDisconnect(self):
        if self._receivedHeaderSize > self.totalHeadersSize:
            error = RelayError(431, f"the request's head is longer than {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            error = RelayError(431, f"the request has more than {self.maxHeaders} headers")
        else:
            error = RelayError(400, "the request is not well-formed HTTP/1.1")
        self.answer_and_close(error)


def _cancel(call):
    """Cancel the ``IDelayedCall`` ``call`` if it is still pending; None, for the attribute that held it."""
    if call is not None and call.active():
        call.cancel()


def _set_headers(request, headers):
    """Set HEADERS (``(name, value)`` text pairs) on ``request``'s answer."""
    for name, value in headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))


class RelaySite(server.Site):
    """
    The relay's ``Site``: ``RelayRequest``s and one structured access-log event per request (no query, no body), at
    info level for errors and debug level (DEBUG) for the rest.
    """

    requestFactory = RelayRequest
    # The channel alone, without Twisted's HTTP/2-negotiating wrapper: the relay speaks HTTP/1.1.
    protocol = RelayChannel
    noisy = False

    def __init__(self, resource, settings, clock):
        # The relay never reads form arguments: Twisted's form parsing would read a whole urlencoded or multipart body
        # into memory (and parse every POST's content-type with the slow email package).
        super().__init__(
            resource, parsePOSTFormSubmission=False, timeout=max(CLIENT_IDLE_TIMEOUT, settings.upstream_timeout)
        )
        self.head_timeout = HEAD_TIMEOUT
        self.body_timeout = BODY_TIMEOUT
        self.body_min_rate = BODY_MIN_RATE
        self.debug = settings.debug
        self.headers = settings.headers
        self._clock = clock
        #: The open connections (a relay channel adds and removes itself), for ``drain``.
        self.channels = set()
        self.draining = False
        self._closed = []

    def drain(self):
        """
        Stop taking requests on open connections (once the listeners stopped): a load balancer would otherwise send
        new ones on its kept-alive connections, and they would be cut off unanswered when the drain ends.
        """
        self.draining = True
        for channel in list(self.channels):
            channel.drain()

    def break_off(self):
        """
        Abort every connection still open (at the end of a drain that ran out of time); fires once the aborts took
        effect. Closed by the stopping reactor instead, an answer cut short (a stream, or bytes still buffered) would
        end with a FIN, and an HTTP/1.0 client would take a body without length for whole; a reset never passes for an
        end.
        """
        for channel in list(self.channels):
            channel.transport.abortConnection()
        # A TCP abort takes effect on the reactor's next turn: the drain (and so the reactor's stop) waits for it.
        return deferLater(self._clock, 0, lambda: None)

    def forget(self, channel):
        """A connection closed."""
        self.channels.discard(channel)
        if not self.channels:
            closed, self._closed = self._closed, []
            for waiting in closed:
                waiting.callback(True)

    def closed(self, timeout):
        """
        After ``drain``: a Deferred firing with True once every connection closed, each having sent what it was
        given (a stopping reactor drops what is still buffered), or with False after ``timeout`` seconds.
        """
        if not self.channels:
            return succeed(True)
        waiting = Deferred()
        self._closed.append(waiting)
        return waiting.addTimeout(timeout, self._clock, onTimeoutCancel=lambda *_: False)

    def log(self, request):
        # Answers below 400 are logged under DEBUG only: a line per request costs more than relaying it.
        if request.code < 400 and not self.debug:
            return
        # An outbound request's path is what the application asked the relay to protect: it is not logged.
        outbound = names_outbound(request.requestHeaders)
        log.emit(
            LogLevel.info if request.code >= 400 else LogLevel.debug,
            "{method} {path} {code} {sent}B" + (" request_id={request_id}" if request.request_id else ""),
            method=request.method.decode("latin-1"),
            path="(outbound)" if outbound else request.path.decode("latin-1")[:200],
            code=request.code,
            sent=request.sentLength,
            request_id=request.request_id,
        )


def decoded_path(raw):
    """
    The percent-decoded path of a raw request path. Dot segments (also with a ``;`` parameter, ``..;``, which servlet
    containers normalise to ``..``) and backslashes (which some servers take for ``/``) are refused, so that no route
    pattern can be escaped upstream (a path that starts with ``/`` and holds none of ``%``, ``/.`` and ``\`` has
    nothing to decode and nothing to refuse).
    """
    if raw.startswith(b"/") and b"%" not in raw and b"/." not in raw and b"\\" not in raw:
        return raw.decode("latin-1")
    path = unquote(raw.decode("latin-1"), errors="replace")
    if "\\" in path:
        raise RelayError(400, "backslashes are not allowed in the path")
    if any(segment.partition(";")[0] in (".", "..") for segment in path.split("/")):
        raise RelayError(400, "dot segments are not allowed in the path")
    return path


class Router(Resource):
    """The relay's single leaf resource; see the module docstring for the dispatch order."""

    isLeaf = True

    def __init__(self, settings, upstream, clock, inbound=None, outbound=None, tracker=None):
        super().__init__()
        self._settings = settings
        self._upstream = upstream
        self._clock = clock
        self._inbound = inbound
        self._outbound = outbound
        self._tracker = tracker
        self._pass_through = compile_routes(settings.pass_through_routes)
        self._mte_routes = compile_routes(settings.mte_routes)
        self._cors_origins = frozenset(o.encode("ascii") for o in settings.cors_origins)
        self._cors_methods = b", ".join(
            m.encode("ascii") for m in dict.fromkeys(settings.cors_methods + ("OPTIONS", "HEAD"))
        )
        self._upstream_base = settings.upstream.encode("ascii")
        token = settings.outbound_token
        self._outbound_token = None if token is None else token.encode("utf-8")

    def set_own_headers(self, request):
        """
        Set the relay's own headers on ``request``'s answer (the request id under DEBUG, HEADERS, CORS) and keep a
        copy for error answers (``own_headers``); True when CORS granted the request's origin.
        """
        if self._settings.debug:
            request.request_id = logs.request_id(request)
            request.setHeader(logs.REQUEST_ID_HEADER, request.request_id.encode("ascii"))
        # twisted.web names itself and its version on every answer: not the relay's to say (a proxied answer keeps
        # the upstream's Server; HEADERS may set one).
        request.responseHeaders.removeHeader(b"server")
        _set_headers(request, self._settings.headers)
        granted = self._cors(request)
        request.own_headers = request.responseHeaders.copy()
        return granted

    def render(self, request):
        if self._tracker is not None:
            self._tracker.track(request)
        granted = self.set_own_headers(request)
        if request.method == b"OPTIONS" and request.requestHeaders.hasHeader(b"access-control-request-method"):
            return self._preflight(request, granted)
        try:
            return self._dispatch(request)
        except RelayError as e:
            return error_response(request, e)

    def _cors(self, request):
        if self._cors_origins:
            # Every answer depends on Origin once any is granted: a cache must not give one origin's answer (or an
            # answer to no origin) to another.
            request.responseHeaders.addRawHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin not in self._cors_origins:
            return False
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(b"access-control-expose-headers", CORS_EXPOSE_HEADERS)
        return True

    def _preflight(self, request, granted):
        if granted:
            request.setHeader(b"access-control-allow-methods", self._cors_methods)
            request.setHeader(b"access-control-allow-headers", CORS_ALLOW_HEADERS)
            request.setHeader(b"access-control-max-age", CORS_MAX_AGE)
        request.setResponseCode(204)
        return b""

    def _route(self, path, headers):
        """Where a request goes, from its decoded path and its headers alone (see the module docstring)."""
        if path == ECHO or path.startswith(ECHO + "/"):
            return "echo"
        if path == ERRORS:
            return "errors"
        if names_outbound(headers):
            return "outbound"
        if path == PAIR_PATH:
            return "pair"
        if path == HELLO_PATH:
            return "hello"
        if headers.hasHeader(RELAY_HEADER):
            # An encoded message: its path may be encoded too, so the inbound role checks MTE_ROUTES once decoded.
            return "inbound"
        if any(path.startswith(p + "/") for p in INBOUND_PATHS):
            return "unencoded"
        if self._pass_through is not None and self._pass_through.fullmatch(path):
            return "proxy"
        if self._mte_routes is None or self._mte_routes.fullmatch(path):
            return "unencoded"
        return "none"

    def routed(self, target, headers):
        """
        ``(decoded path, route, x-mte-relay parsed)`` of a request for ``target`` (its raw request target) with
        ``headers`` (the header only for the ``inbound`` route, else None), or the ``RelayError`` that answers it
        when the target is not a path it takes or the header is malformed. ``RelayRequest`` works it out once, on
        the request's head, for ``body_limit``, dispatch and the inbound role.
        """
        if not target.startswith(b"/"):
            return RelayError(400, "the request target must be a path")
        try:
            path = decoded_path(target.partition(b"?")[0])
            route = self._route(path, headers)
            header = RelayHeader.parse(headers.getRawHeaders(RELAY_HEADER)[-1]) if route == "inbound" else None
        except RelayError as e:
            return e
        return path, route, header

    def body_limit(self, routed, headers):
        """
        ``(limit, error)`` for a request ``routed`` so, with ``headers``: its body is refused with ``error`` once
        over ``limit`` bytes, before it is read on. A body nothing will read (the relay's own routes', a request
        the inbound role refuses for want of ``x-mte-relay`` or on its head, ``Inbound.head_refusal``, one without
        the outbound token, one that no route takes) is refused at once, and a pair request beyond
        ``MAX_PAIR_BODY``: else anyone could make the relay take in MAX_BODY_SIZE before refusing it.
        """
        if isinstance(routed, RelayError):
            return 0, routed
        path, route, header = routed
        if route in ("echo", "errors", "hello") or headers.hasHeader(b"access-control-request-method"):
            # (A CORS preflight is answered whatever its route.)
            return 0, RelayError(413, "this route takes no body")
        if route == "outbound" and not self._token_ok(headers):
            return 0, RelayError(401)
        if route == "pair":
            return MAX_PAIR_BODY, RelayError(413, f"a pair request is at most {MAX_PAIR_BODY} bytes")
        if route == "unencoded":
            return 0, RelayError(569, "x-mte-relay header is missing")
        if route == "none":
            return 0, RelayError(404)
        if route == "inbound" and not header.url and self._mte_routes is not None:
            # An encoded message's visible path is checked as the inbound role would, before its body is read.
            if not self._mte_routes.fullmatch(path):
                return 0, RelayError(404)
        head_refusal = getattr(self._inbound, "head_refusal", None)
        if route == "inbound" and head_refusal is not None:
            refusal = head_refusal(headers, header)
            if refusal is not None:
                return 0, refusal
        return self._settings.max_body_size, RelayError(413)

    def pair_lookup(self, routed):
        """The inbound role's lookup of the pair an encoded message names (``Inbound.pair_lookup``), started on the
        head of one with a body; None for any other request."""
        lookup = getattr(self._inbound, "pair_lookup", None)
        if lookup is None or isinstance(routed, RelayError) or routed[1] != "inbound":
            return None
        return lookup(routed[2])

    def _dispatch(self, request):
        # Worked out on the request's head (a unit test's DummyRequest has none).
        routed = getattr(request, "routed", None) or self.routed(request.uri, request.requestHeaders)
        if isinstance(routed, RelayError):
            raise routed
        path, route, _ = routed
        if route == "echo":
            message = path[len(ECHO) + 1 :]
            return _json(request, 200, {"echo": message or True, "time": int(self._clock.seconds() * 1000)})
        if route == "errors":
            return _json(request, 200, error_table())
        if route == "outbound":
            self._check_outbound_token(request)
            return self._handle(self._outbound, request)
        if route == "proxy":
            return self._proxy(request)
        if route == "none":
            raise RelayError(404)
        return self._handle(self._inbound, request)

    def _token_ok(self, headers):
        # Exactly one token: with several, which one a later hop would read is anyone's guess.
        given = headers.getRawHeaders(OUTBOUND_TOKEN_HEADER, [])
        token = self._outbound_token
        return token is not None and len(given) == 1 and hmac.compare_digest(given[0], token)

    def _check_outbound_token(self, request):
        if not self._token_ok(request.requestHeaders):
            raise RelayError(401)

    def _handle(self, handler, request):
        if handler is None:
            raise RelayError(501)
        return handler.render(request)

    def _proxy(self, request):
        headers = upstream_headers(request, self._settings.headers)
        url = self._upstream_base + request.uri
        timeout = self._settings.upstream_timeout
        done = ensureDeferred(forward(request, self._upstream, url, headers, self._clock, timeout))

        def failed(failure):
            if not failure.check(RelayError):
                log.failure("pass-through failed", failure)
            send_error(request, failure.value if failure.check(RelayError) else RelayError(502))

        done.addErrback(failed)
        return server.NOT_DONE_YET


def build_resource(settings, upstream, clock, inbound=None, outbound=None, tracker=None):
    """
    The relay's resource tree for ``settings``, forwarding through the ``IUpstreamClient`` ``upstream`` and reading
    time from ``clock``. ``inbound`` and ``outbound`` are the MTE handlers (None answers 501); ``tracker`` an
    ``InFlight`` that counts requests for draining.
    """
    return Router(settings, upstream, clock, inbound, outbound, tracker)
