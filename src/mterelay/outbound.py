"""
The outbound role: a local application sends a plain request carrying ``x-mte-outbound-token`` and
``x-mte-upstream``; the relay encodes it to that peer relay with ``mterelay.client``, and hands the application the
decoded answer.

Only peers listed in ALLOWED_PEERS are reached (no open proxy), each through one ``Client`` (its pools of pairs are
shared by every concurrent request), pinned to the peer's identity key when PEER_PINS names one. The router has
already checked the outbound token in constant time before calling this handler.
"""

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH

from mterelay.client import Client
from mterelay.codec import CodecError, b64decode, is_token
from mterelay.config import normalize_origin
from mterelay.errors import CODES, RelayError
from mterelay.upstream import (
    abort_client,
    discard_body,
    end_to_end,
    merge_end_to_end,
    stream_response,
    transformed_length,
)
from mterelay.web import ORIGIN_FORM, UPSTREAM_HEADER, send_error

log = Logger()

_BOOLEANS = {b"true": True, b"false": False}
MAX_PEER_SPELLINGS = 64


def _option(request, name, parse, default):
    value = request.getHeader(name)
    if value is None:
        return default
    try:
        return parse(value.strip())
    except (KeyError, ValueError):
        raise RelayError(400, f"{name.decode()} has an unsupported value") from None


def _encode_type(value):
    value = value.upper()
    if value not in (b"MKE", b"MTE"):
        raise ValueError
    return value.decode("ascii")


def _encode_headers(value):
    """``true``, ``false``, or a comma list of header names to protect."""
    if value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    names = [name.strip() for name in value.split(b",") if name.strip()]
    if not names or not all(is_token(name.decode("latin-1")) for name in names):
        raise ValueError
    return names


def _boolean(value):
    return _BOOLEANS[value.lower()]


class Outbound:
    """
    The outbound handler. ``agent`` is the ``IAgent`` that reaches peer relays (a pool that resends nothing),
    ``clock`` bounds every exchange by UPSTREAM_TIMEOUT.
    """

    def __init__(self, settings, agent, clock):
        self._settings = settings
        self._agent = agent
        self._clock = clock
        self._allowed = frozenset(settings.allowed_peers)
        self._extra_headers = {
            name.lower().encode("latin-1"): value.encode("latin-1") for name, value in settings.headers
        }
        # At most one client per allowed peer: the table is bounded by ALLOWED_PEERS.
        self._clients = {}
        # x-mte-upstream values already found allowed, so the usual request skips parsing its URL.
        self._peer_spellings = {}

    def _client(self, origin):
        client = self._clients.get(origin)
        if client is None:
            pin = self._settings.peer_pin(origin)
            client = Client(
                origin,
                self._agent,
                self._clock,
                pool_size=self._settings.max_pool_size,
                pin=None if pin is None else b64decode(pin),
                timeout=self._settings.upstream_timeout,
            )
            self._clients[origin] = client
        return client

    def _peer(self, request):
        values = request.requestHeaders.getRawHeaders(UPSTREAM_HEADER, [])
        if len(values) != 1:
            raise RelayError(400, "x-mte-upstream header must be given once")
        value = values[0]
        origin = self._peer_spellings.get(value)
        if origin is not None:
            return origin
        try:
            origin = normalize_origin(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise RelayError(400, "x-mte-upstream is not an http(s) origin") from None
        if origin not in self._allowed:
            raise RelayError(403, "x-mte-upstream is not one of ALLOWED_PEERS")
        if len(self._peer_spellings) < MAX_PEER_SPELLINGS:
            self._peer_spellings[value] = origin
        return origin

    def render(self, request):
        origin = self._peer(request)
        if not ORIGIN_FORM.fullmatch(request.uri):
            # The peer relay would refuse it (562) once decoded: say what is wrong before sending anything.
            raise RelayError(400, "the request target is not a path and query of RFC 3986 characters")
        options = {
            "encode_type": _option(request, b"x-mte-encode-type", _encode_type, "MKE"),
            "encode_headers": _option(request, b"x-mte-encode-headers", _encode_headers, True),
            "encode_url": _option(request, b"x-mte-encode-url", _boolean, True),
        }
        if self._extra_headers and options["encode_headers"] is not True:
            # HEADERS is the operator's, and on this side only local applications see it (it may be an upstream
            # API key): sealed between the relays whatever the application asks for.
            options["encode_headers"] = [*(options["encode_headers"] or ()), *self._extra_headers]
        exchange = ensureDeferred(self._exchange(request, self._client(origin), options))
        gone = []

        def client_gone(reason):
            gone.append(reason)
            exchange.cancel()

        def failed(failure):
            if gone:
                return
            if request.startedWriting:
                abort_client(request)
                return
            send_error(request, _peer_error(failure))

        request.notifyFinish().addErrback(client_gone)
        exchange.addErrback(failed)
        return server.NOT_DONE_YET

    async def _exchange(self, request, client, options):
        # Header pairs straight from the request (no intermediate Headers); HEADERS overrides what the app sent.
        extra = self._extra_headers
        headers = [
            (name, value)
            for name, values in end_to_end(request.requestHeaders, (b"host", b"content-length", *extra))
            for value in values
        ]
        headers += extra.items()
        content = request.content
        content.seek(0, 2)
        has_body = content.tell() > 0 or request.requestHeaders.hasHeader(b"content-length")
        content.seek(0)
        response = await client.request(
            request.method, request.uri, headers=headers, data=content if has_body else None, **options
        )
        original = response.original
        if response.relay_error:
            # Unsealed: the peer relay's own error, or a balancer's between the relays. Anyone on the way could have
            # written its headers and body, so only its status is passed on, in an error of A's own.
            discard_body(original)
            raise _peer_answered(response.code)
        length = UNKNOWN_LENGTH
        if response.decoder is not None and original.length is not UNKNOWN_LENGTH:
            try:
                # Unknown for a framed (streamed) body, which goes on chunked whatever length it came with.
                length = transformed_length(response.decoder, original.length)
            except CodecError:
                discard_body(original)
                raise RelayError(562, "the peer relay's answer has a length no encoded body has") from None
        request.setResponseCode(response.code, response.phrase)
        merge_end_to_end(response.headers, request.responseHeaders)
        if length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % length)
        elif response.decoder is None:
            # No body (HEAD, 204, 304): the length the upstream declared travelled in the sealed block.
            for value in response.headers.getRawHeaders(b"content-length", [])[-1:]:
                request.setHeader(b"content-length", value)
        await stream_response(original, request, response.decoder, self._clock, self._settings.upstream_timeout)


def _peer_answered(code):
    """
    The error for an unsealed answer of ``code`` from the peer: the same code when it is one of the relay's errors
    (but 401 and 403, which would blame the application's token or peer), else 502.
    """
    if code in CODES and code not in (401, 403):
        return RelayError(code, f"the peer relay answered {code} ({CODES[code].name})")
    return RelayError(502, f"the peer relay answered {code}")


def _peer_error(failure):
    """The answer for a failed exchange with the peer relay."""
    if failure.check(RelayError):
        return failure.value
    if failure.check(ConnectError, DNSLookupError):
        return RelayError(502, "the peer relay could not be reached")
    log.info("exchange with the peer relay failed: {error}", error=failure.type.__name__)
    return RelayError(502, "the exchange with the peer relay broke off")
