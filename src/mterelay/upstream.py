"""
Forwarding a twisted.web request to an HTTP upstream, streaming both bodies through optional body transforms.

A body transform has ``feed(data: bytes) -> list[bytes]`` and ``finish() -> list[bytes]`` (its output in pieces,
written one by one, so that none is copied) and may raise a ``RelayError``; when it can tell its output size from its
input size it also has ``output_length(n: int) -> int``, and when it works in blocks, ``read_size`` (the input
size of one block: a file is read in such pieces so that no block has to be joined from two reads). The
pass-through route uses no transform; the inbound relay passes the codec's decoder (request) and encoder (response).
"""

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web._newclient import BODY, HTTP11ClientProtocol, RequestTransmissionFailed, ResponseFailed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import Interface, implementer

from mterelay.codec import is_token
from mterelay.errors import RelayError

log = Logger()

#: Bytes read from the spooled request body per cooperative step (unless the transform asks for its ``read_size``).
READ_SIZE = 64 * 1024

HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"http2-settings")
)


class IUpstreamClient(Interface):
    """Sends one HTTP request to an upstream and gives its response, without following redirects."""

    def request(method, url, headers, bodyProducer):
        """
        Send ``method`` (bytes) to the absolute ``url`` (bytes) with ``headers`` (``Headers``, sent as given plus the
        Host of ``url``) and ``bodyProducer`` (an ``IBodyProducer`` or None).

        @return: a Deferred firing with the ``IResponse`` once its headers arrived; cancelling it abandons the request.
        """


@implementer(IUpstreamClient)
class AgentUpstreamClient:
    """
    ``IUpstreamClient`` over a twisted.web ``Agent`` that shares one persistent connection pool.

    treq's ``HTTPClient`` is not used for forwarding because it always rewrites ``Accept-Encoding``, decompresses gzip
    answers and keeps a cookie jar shared by every caller: a relay must pass both directions through untouched.
    """

    def __init__(self, agent):
        self._agent = agent

    def request(self, method, url, headers, bodyProducer):
        return self._agent.request(method, url, headers, bodyProducer)


@implementer(IAgentEndpointFactory)
class CachedEndpointFactory:
    """
    Endpoints for an ``Agent``, built once per (scheme, host, port). ``Agent`` otherwise builds a new endpoint for
    every request, even one served by a pooled connection, and building a ``HostnameEndpoint`` runs IDNA over the host
    name each time. Holds at most ``max_size`` endpoints (UPSTREAM and the peer relays need a handful).
    """

    def __init__(self, reactor, tls_policy=None, max_size=256):
        self._reactor = reactor
        self._policy = BrowserLikePolicyForHTTPS() if tls_policy is None else tls_policy
        self._max_size = max_size
        self._endpoints = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self._endpoints) >= self._max_size:
                del self._endpoints[next(iter(self._endpoints))]
            self._endpoints[key] = endpoint
        return endpoint


#: Bytes an answer's head may take (counting what arrives with it of the body): Twisted's client reads header lines
#: without limit, so an upstream or peer sending endless headers would grow the relay's memory without bound.
MAX_ANSWER_HEAD = 256 * 1024


class _BoundedHeadProtocol(HTTP11ClientProtocol):
    _head_bytes = 0
    #: Why the connection was lost (None while it is open).
    lost = None

    def request(self, request):
        self._head_bytes = 0
        pending = super().request(request)
        return pending.addCallback(self._head_received, self._parser)

    def _head_received(self, response, parser):
        """
        Give every consumer an answer's head as it was meant: Twisted's client keeps Connection, and a 304's
        Content-Length, among the connection headers it never puts in ``response.headers``.
        """
        connection = parser.connHeaders
        if response.code == 304:
            # RFC 9110 8.6: the length the 200 would have had (Twisted makes this exception only for HEAD).
            length = connection.getRawHeaders(b"content-length")
            if length and length[-1].isdigit():
                response.headers.setRawHeaders(b"content-length", length[-1:])
        # RFC 9110 7.6.1: the names Connection lists are this hop's, never passed on.
        for name in _listed(connection.getRawHeaders(b"connection", ())):
            response.headers.removeHeader(name)
        if response.length is UNKNOWN_LENGTH and not connection.hasHeader(b"transfer-encoding"):
            return _CloseDelimitedResponse(response, self)
        return response

    def connectionLost(self, reason):
        self.lost = reason
        super().connectionLost(reason)

    def dataReceived(self, data):
        parser = self._parser
        if parser is not None and parser.state != BODY:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_ANSWER_HEAD:
                # The request fails as for any connection lost before its answer (502).
                log.info("an answer's head took over {limit} bytes: connection dropped", limit=MAX_ANSWER_HEAD)
                self.transport.abortConnection()
                return
        super().dataReceived(data)


class _CloseDelimitedResponse(proxyForInterface(IResponse)):
    """
    An answer whose body ends where its connection does: Twisted reports ``PotentialDataLoss`` at the end whether the
    upstream closed cleanly or the connection was reset partway, so the body ends normally only after a clean close.
    """

    def __init__(self, original, connection):
        super().__init__(original)
        self._connection = connection

    def deliverBody(self, protocol):
        self.original.deliverBody(_CleanCloseOnly(protocol, self._connection))


class _CleanCloseOnly(Protocol):
    """Passes a close-delimited body to ``protocol``, and a failure instead of its end when the close was not clean."""

    def __init__(self, protocol, connection):
        self._protocol = protocol
        self._connection = connection

    def makeConnection(self, transport):
        self._protocol.makeConnection(transport)

    def dataReceived(self, data):
        self._protocol.dataReceived(data)

    def connectionLost(self, reason):
        lost = self._connection.lost
        if reason.check(PotentialDataLoss) and (lost is None or not lost.check(ConnectionDone)):
            # A reset (or an abort, a TLS close without close_notify) partway: broken off like a short
            # Content-Length body.
            reason = Failure(ResponseFailed([reason] if lost is None else [lost, reason]))
        self._protocol.connectionLost(reason)


class _BoundedHeadFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr):
        return _BoundedHeadProtocol(self._quiescentCallback)


class BoundedPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` whose connections drop an answer whose head takes over ``MAX_ANSWER_HEAD`` bytes."""

    _factory = _BoundedHeadFactory


#: Idle keep-alive connections kept per upstream host or peer relay; more open on demand. Sized for hundreds of
#: concurrent requests: a connection closed and reopened per request costs more than the relaying itself.
POOL_PERSISTENT_PER_HOST = 512
#: Seconds a pooled connection may stay idle (Twisted's default is 240): less than the 60 s that a relay
#: (web.CLIENT_IDLE_TIMEOUT) and common load balancers allow, so that the pool drops it before its server does. A
#: request sent as the server closes the connection is lost (502; a bodiless one may be sent again, see make_pool).
POOL_IDLE_TIMEOUT = 50


def make_pool(reactor, resend=True):
    """
    The relay's persistent ``BoundedPool``. With ``resend`` (Twisted's default), a bodiless request whose kept-alive
    connection broke before its answer is sent again on a new connection, which may deliver it twice.
    """
    pool = BoundedPool(reactor, persistent=True)
    pool.maxPersistentPerHost = POOL_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = POOL_IDLE_TIMEOUT
    pool.retryAutomatically = resend
    return pool


def make_agent(reactor, pool):
    """The relay's ``Agent`` over ``pool``: TLS checked like a browser, endpoints cached."""
    return Agent.usingEndpointFactory(reactor, CachedEndpointFactory(reactor), pool=pool)


def _listed(values):
    """
    The lower-case names that Connection header values list (hop-by-hop for this message). Empty list elements are
    allowed (RFC 9110 5.6.1: ``close, ``) and anything that is no header name cannot name a header: both are skipped.
    """
    names = (name.strip().lower() for value in values for name in value.split(b","))
    return {name for name in names if is_token(name.decode("latin-1"))}


def _passes(lower, listed, drop):
    return not (
        lower in HOP_BY_HOP
        or lower in listed
        or lower in drop
        or lower.startswith(b"proxy-")
        or lower.startswith(b"x-mte-")
    )


def end_to_end(headers, drop=()):
    """
    ``(name, values)`` of the headers to pass on: not hop-by-hop (Connection and the names it lists, Keep-Alive, TE,
    Trailer, Transfer-Encoding, Upgrade, Proxy-*), not ``x-mte-*``, and not the lower-case names in ``drop``.
    """
    listed = _listed(headers.getRawHeaders(b"connection", ()))
    for name, values in headers.getAllRawHeaders():
        if _passes(name.lower(), listed, drop):
            yield name, values


def filter_headers(headers, drop=()):
    """A copy of ``headers`` with only what ``end_to_end`` passes on."""
    kept = Headers()
    for name, values in end_to_end(headers, drop):
        kept.setRawHeaders(name, values)
    return kept


def merge_end_to_end(source, target):
    """
    Copy ``source``'s end-to-end headers but Content-Length into ``target``, leaving the names it already has; but
    Date (twisted.web stamps every answer with the time of relaying, where a proxy passes the origin's on) and Vary,
    whose names are merged (the relay's ``Vary: Origin`` must not hide what the upstream's answer varies on).
    """
    for name, values in end_to_end(source, (b"content-length",)):
        lower = name.lower()
        if lower == b"vary" and target.hasHeader(name):
            target.setRawHeaders(name, [_vary_union(values, target.getRawHeaders(name))])
        elif lower == b"date" or not target.hasHeader(name):
            target.setRawHeaders(name, values)


def _vary_union(*headers):
    """One Vary value naming every field the ``headers`` (lists of values) name, first spelling kept; ``*`` alone
    stays ``*`` (RFC 9110 12.5.5)."""
    names = {}
    for values in headers:
        for value in values:
            for name in value.split(b","):
                names.setdefault(name.strip().lower(), name.strip())
    names.pop(b"", None)
    return b"*" if b"*" in names else b", ".join(names.values())


def upstream_headers(request, extra=(), opened=(), hidden=(), allowed=None):
    """
    The headers to send upstream for ``request``: its end-to-end headers (but the ``hidden`` names, and with
    ``allowed``, a set of lower-case names, only those and X-Forwarded-For), overlaid by the ``opened`` ``(name,
    value)`` pairs of a header block (which replace the visible headers of their names and are filtered alike), then
    ``X-Forwarded-For/-Proto/-Host``, then the ``extra`` pairs (HEADERS). Host and Content-Length are left to the
    agent.
    """
    framing = (b"host", b"content-length")
    visible = request.requestHeaders
    # A Connection header names headers of its own hop. A sealed one may name sealed headers; a visible one only
    # visible ones, or anyone on the way could strip sealed headers by naming them.
    sealed_listed = _listed(value for name, value in opened if name.lower() == b"connection")
    listed = sealed_listed | _listed(visible.getRawHeaders(b"connection", ()))
    drop = {*framing, *hidden, *(name.lower() for name, _ in opened)}
    headers = Headers()
    for name, values in visible.getAllRawHeaders():
        lower = name.lower()
        if _passes(lower, listed, drop) and (allowed is None or lower in allowed or lower == b"x-forwarded-for"):
            headers.setRawHeaders(name, values)
    for name, value in opened:
        if _passes(name.lower(), sealed_listed, framing):
            headers.addRawHeader(name, value)
    peer = request.getClientAddress()
    forwarded_for = headers.getRawHeaders(b"x-forwarded-for", [])
    host = getattr(peer, "host", None)
    if host:
        forwarded_for = [b", ".join(forwarded_for + [host.encode("ascii")])]
    if forwarded_for:
        headers.setRawHeaders(b"x-forwarded-for", forwarded_for)
    headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    client_host = request.getHeader(b"host")
    if client_host:
        headers.setRawHeaders(b"x-forwarded-host", [client_host])
    for name, value in extra:
        headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
    return headers


class IdleDeadline:
    """
    ``Deferred.addTimeout`` whose time starts over at every ``touch()``: a request's wait for its answer is counted
    from the last byte of its body that went out, so an upload that keeps moving never times out however long it
    is, while one the other side stops reading does.
    """

    def __init__(self, clock, seconds, on_timeout):
        self._clock = clock
        self._seconds = seconds
        self._on_timeout = on_timeout
        self._call = None

    def touch(self):
        """Start the time over (body progress)."""
        if self._call is not None and self._call.active():
            self._call.reset(self._seconds)

    def bound(self, d):
        """Cancel ``d`` once the time runs out; it then fails with what ``on_timeout(result, seconds)`` raises."""
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        def settle(result):
            if self._call.active():
                self._call.cancel()
            return self._on_timeout(result, self._seconds) if expired else result

        self._call = self._clock.callLater(self._seconds, expire)
        return d.addBoth(settle)


def standard_phrase(code):
    """The standard reason phrase of ``code`` (empty for an unknown one): what a sealed answer carries, since a
    phrase is free text that nothing authenticates."""
    return RESPONSES.get(code, b"")


def _feed(transform, data):
    return (data,) if transform is None else transform.feed(data)


def transformed_length(transform, length):
    """The length of a body of ``length`` bytes once through ``transform``, or ``UNKNOWN_LENGTH`` when the transform
    cannot tell it from the input length (it has no ``output_length``: a framed body)."""
    if transform is None:
        return length
    output_length = getattr(transform, "output_length", None)
    return UNKNOWN_LENGTH if output_length is None else output_length(length)


@implementer(IBodyProducer)
class RequestBodyProducer:
    """
    Produces a request body read from the file ``source`` (positioned at its start) through an optional transform.

    ``length`` is the transform's output length for ``input_length`` input bytes when it can tell, else unknown (the
    agent then sends it chunked). Pausing pauses the reading, so at most one chunk waits in memory. ``progress``,
    when given, is called after every chunk the consumer took (``IdleDeadline.touch``).
    """

    def __init__(self, source, input_length, transform=None, cooperator=task, progress=None):
        self._source = source
        self._transform = transform
        self._cooperator = cooperator
        self._progress = progress
        self._task = None
        self._read_size = getattr(transform, "read_size", READ_SIZE)
        self._small = input_length is not UNKNOWN_LENGTH and input_length <= self._read_size
        self.length = transformed_length(transform, input_length)

    def startProducing(self, consumer):
        if self._small:
            # One read holds it all: write it now rather than schedule a cooperative task for it.
            try:
                for _ in self._produce(consumer):
                    pass
            except Exception:
                return fail()
            return succeed(None)
        self._task = self._cooperator.cooperate(self._produce(consumer))
        done = self._task.whenDone()

        def stopped(reason):
            # The agent stopped us (it reports the failure itself), or the request was over (twisted.web closed its
            # body file) while the upload still went on: either way this Deferred must never fire.
            if not (reason.check(task.TaskStopped) or getattr(self._source, "closed", False)):
                return reason
            return Deferred()

        return done.addCallbacks(lambda _: None, stopped)

    def _produce(self, consumer):
        transform = self._transform
        while True:
            chunk = self._source.read(self._read_size)
            if not chunk:
                break
            for piece in _feed(transform, chunk):
                consumer.write(piece)
            if self._progress is not None:
                self._progress()
            yield None
        if transform is not None:
            for piece in transform.finish():
                consumer.write(piece)
        if self._progress is not None:
            self._progress()

    def pauseProducing(self):
        self._control("pause")

    def resumeProducing(self):
        self._control("resume")

    def stopProducing(self):
        self._control("stop")

    def _control(self, action):
        if self._task is None:
            return
        # The consumer may pause or stop us after the last chunk: the task is then over, which is fine.
        try:
            getattr(self._task, action)()
        except (task.TaskDone, task.TaskFailed, task.TaskStopped):
            pass


def request_body_producer(request, transform=None, cooperator=task, progress=None):
    """A ``RequestBodyProducer`` for ``request``'s (spooled) body, or None when the request has no body."""
    headers = request.requestHeaders
    if not headers.hasHeader(b"content-length") and not headers.hasHeader(b"transfer-encoding"):
        return None
    source = request.content
    source.seek(0, 2)
    length = source.tell()
    source.seek(0)
    return RequestBodyProducer(source, length, transform, cooperator, progress)


def abort_client(request):
    """Break off ``request``'s connection so a client never takes a truncated body for a whole one."""
    transport = request.transport
    if transport is not None:
        getattr(transport, "abortConnection", transport.loseConnection)()


class _BodyRelay(Protocol):
    """
    Writes an upstream body into a twisted.web request, pausing the upstream while the client is slow. Both are
    broken off when, for ``idle_timeout`` seconds (on ``clock``), the upstream sends nothing while we wait for it, or
    the client reads nothing while the upstream waits for it (twisted.web's own timeout is off while it answers).
    """

    def __init__(self, request, transform, done, clock=None, idle_timeout=None):
        self._request = request
        self._transform = transform
        self._done = done
        self._stopped = False
        self._ended = False  # the upstream body ended: nothing left to wait for on either side
        self._paused = False  # by the client: the idle timer then runs for the client, not the upstream
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle = None

    def connectionMade(self):
        if self._request.channel is None:
            # The client left before the body started: nobody to write to.
            self._stopped = True
            self.transport.stopProducing()
            return
        self._request.registerProducer(self, True)
        self._arm()

    def _arm(self):
        """Start (or restart) the idle timer, for the client while it holds the relay paused, else for the upstream."""
        if self._clock is None or self._idle_timeout is None or self._ended:
            return
        expired = self._stalled if self._paused else self._idled
        if self._idle is not None and self._idle.active() and self._idle.func == expired:
            self._idle.reset(self._idle_timeout)
        else:
            self._disarm()
            self._idle = self._clock.callLater(self._idle_timeout, expired)

    def _disarm(self):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()

    def _idled(self):
        log.info("upstream body stalled for {seconds} s: breaking off", seconds=self._idle_timeout)
        self._break(Failure(RelayError(504, "the upstream stopped sending its body")))

    def _stalled(self):
        log.info("client read nothing for {seconds} s: breaking off", seconds=self._idle_timeout)
        self._break(Failure(RelayError(504, "the client stopped reading the answer")))

    def pauseProducing(self):
        # Waiting for our client is not the upstream's idleness, but a client that never reads again must not hold
        # both connections for good.
        self._paused = True
        self.transport.pauseProducing()
        self._arm()

    def resumeProducing(self):
        self._paused = False
        self.transport.resumeProducing()
        self._arm()

    def stopProducing(self):
        """The client went away: stop reading the upstream."""
        self._disarm()
        if not self._stopped:
            self._stopped = True
            self.transport.stopProducing()

    def dataReceived(self, data):
        if self._stopped:
            return
        # Data already read can still arrive once paused: it keeps the timer on the client (see _arm).
        self._arm()
        try:
            out = _feed(self._transform, data)
        except RelayError:
            self._break(Failure())
            return
        for piece in out:
            self._request.write(piece)

    def connectionLost(self, reason):
        self._ended = True
        self._disarm()
        if self._stopped:
            self._settle(reason)
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._break(reason)
            return
        try:
            tail = () if self._transform is None else self._transform.finish()
        except RelayError:
            self._break(Failure())
            return
        for piece in tail:
            self._request.write(piece)
        self._request.unregisterProducer()
        self._request.finish()
        self._settle(None)

    def _break(self, reason):
        """
        A failure of the body: nothing more is forwarded. Once part of the answer went out, the client connection is
        aborted (a truncated body must never pass for a whole one); before that, the caller answers the error.
        """
        self.stopProducing()
        self._request.unregisterProducer()
        if self._request.startedWriting:
            abort_client(self._request)
        self._settle(reason)

    def _settle(self, reason):
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason) if reason is not None else done.callback(None)


def copy_response_head(response, request, transform=None):
    """
    Set ``request``'s status and headers from the upstream ``response``: end-to-end headers only, every Set-Cookie
    kept, and names the relay already set (CORS, HEADERS, request id) left as the relay set them.
    """
    request.setResponseCode(response.code, response.phrase)
    merge_end_to_end(response.headers, request.responseHeaders)
    given = response.headers.getRawHeaders(b"content-length")
    # The agent gives an answer without body (HEAD, 204, 304) the length 0, which is no body's length.
    bodiless = request.method == b"HEAD" or response.code in NO_BODY_CODES
    if transform is None and given:
        # Copied as given: for HEAD and 304 it describes a body that is not sent.
        request.responseHeaders.setRawHeaders(b"content-length", given[-1:])
    elif response.length is not UNKNOWN_LENGTH and not bodiless:
        length = transformed_length(transform, response.length)
        if length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % (length,))


def stream_response(response, request, transform=None, clock=None, idle_timeout=None):
    """
    Stream ``response``'s body into ``request`` through ``transform`` and finish it; with ``clock``, an upstream that
    sends nothing for ``idle_timeout`` seconds (while the client keeps up) is broken off.

    @return: a Deferred firing with None once the body was delivered, or failing when the upstream broke off or
        stalled, the transform raised, or the client went away. If part of the answer was written by then, the client
        connection is aborted (never silently truncated); if not, the request is left for the caller to answer.
    """
    if response.length is UNKNOWN_LENGTH:
        # A stream (server-sent events, a long poll) may send nothing for a while: its head goes out now, as the
        # upstream sent it (twisted.web would hold it until the first body bytes), so the client sees it open.
        request.write(b"")
    done = Deferred()
    relay = _BodyRelay(request, transform, done, clock, idle_timeout)
    request.notifyFinish().addErrback(lambda _: relay.stopProducing())
    response.deliverBody(relay)
    return done


class _Discard(Protocol):
    def connectionMade(self):
        self.transport.stopProducing()


def discard_body(response):
    """Drop ``response``'s body unread (its connection closes), so that it is neither buffered nor left pending."""
    response.deliverBody(_Discard())


def upstream_error(failure):
    """The ``RelayError`` that answers a failed upstream request: a transform's own error (504 on timeout), else 502."""
    if failure.check(RelayError):
        return failure.value
    if failure.check(RequestTransmissionFailed):
        for reason in failure.value.reasons:
            if reason.check(RelayError):
                return reason.value
    return RelayError(502)


def _timed_out(result, timeout):
    # Cancelling an agent request may fail it with a wrapped CancelledError: whatever it failed with, it was late.
    raise RelayError(504)


async def forward(request, upstream, url, headers, clock, timeout, request_transform=None, prepare_response=None):
    """
    Forward ``request`` to ``url`` through ``upstream`` and stream the answer back (a coroutine: the inbound role
    awaits it, the pass-through route wraps it in ``ensureDeferred``).

    ``timeout`` seconds (measured on ``clock``) bound the wait for the response headers, counted from the request
    body's last progress (``IdleDeadline``). ``prepare_response(response,
    request)``, when given, runs once the headers arrived and returns the response body transform (or None); it may set
    response headers or raise a ``RelayError``. A client that disconnects cancels the upstream request.

    Returns None once the exchange ended, or raises a ``RelayError`` that the caller must answer when nothing was
    sent to the client yet.
    """
    client_gone = []
    deadline = IdleDeadline(clock, timeout, _timed_out)
    producer = request_body_producer(request, request_transform, progress=deadline.touch)
    pending = deadline.bound(upstream.request(request.method, url, headers, producer))

    def gone(reason):
        client_gone.append(reason)
        pending.cancel()

    request.notifyFinish().addErrback(gone)
    try:
        response = await pending
    except Exception:
        if client_gone:
            log.debug("client went away before the upstream answered {method}", method=request.method.decode())
            return None
        error = upstream_error(Failure())
        log.info("upstream request failed: {code} {reason}", code=error.code, reason=error.detail)
        raise error from None
    if client_gone:
        discard_body(response)
        return None
    if not 100 <= response.code <= 599:
        # RFC 9110 15: a status outside 100-599 is invalid and is to be taken as a server error.
        discard_body(response)
        log.info("upstream answered an invalid status {code}", code=response.code)
        raise RelayError(502, f"the upstream answered an invalid status ({response.code})")
    try:
        transform = None if prepare_response is None else prepare_response(response, request)
    except RelayError:
        discard_body(response)
        raise
    copy_response_head(response, request, transform)
    try:
        await stream_response(response, request, transform, clock, timeout)
    except Exception as e:
        if request.startedWriting or client_gone:
            log.info("response stream broken off: {error}", error=type(e).__name__)
            return None
        # Nothing of the answer went out: the client gets the error instead.
        raise upstream_error(Failure()) from None
    return None
