"""
``mterelay.client``: a Python client (on any Twisted ``IAgent``) that pairs with a relay and sends encoded requests.

``Client(relay_url).request(method, url, headers=, data=, encode_type=, encode_headers=, encode_url=)`` returns a
``RelayResponse`` with the upstream's status, its decoded headers and a decoded, streamable body. The client discovers
the relay (``HEAD /api/mte-relay``), keeps pools of pairs per encode type, re-pairs by itself when the relay lost or
refused a pair (559, 560, 564, 566; 562, and 563 for a message with a body) and then sends the message once more,
since request bodies are always replayable (bytes or a seekable file).

MKE pairs carry any number of concurrent requests (each reserves its own counter), so one MKE pair per relay serves
all. An MTE pair is a strict ratchet that carries one request at a time: the MTE pool grows up to ``pool_size`` pairs,
and further requests wait for a pair to come back.

Command line, like curl: ``python -m mterelay.client URL [-X METHOD] [-d DATA|@file] [-H 'Name: value']
[--encode-type MKE|MTE] [--pin=KEY]`` (``--pin=``: a base64url key may start with ``-``).
"""

import argparse
import hmac
import io
import json
import os
import re
import secrets
from collections import deque
from urllib.parse import urlsplit

import attrs
import treq
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from mterelay.codec import (
    CLIENT_ID_HEADER,
    ENCODE_TYPES,
    ENCODED_HEADERS,
    HEADERS,
    RELAY_HEADER,
    URL,
    VISIBLE_HEADERS,
    ClientPairing,
    CodecError,
    RelayHeader,
    UnencodableHeader,
    b64decode,
    b64encode,
    check_id,
    decode_header_block,
    encode_header_block,
    request_binding,
    response_binding,
)
from mterelay.errors import CODES, RelayError
from mterelay.upstream import IdleDeadline, RequestBodyProducer, filter_headers, make_pool, standard_phrase

log = Logger()

#: Longest answer the client reads whole: discovery, pairing, and refused answers read off for connection reuse.
MAX_SMALL_ANSWER = 1 << 16
#: The signature part of a client id token ``<id>.<signature>`` (its exact form is the relay's business).
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Headers that describe the encoded message itself, never protected or sent as they were.
_FRAMING = (b"content-length", b"transfer-encoding", b"host")


class CounterRefused(RelayError):
    """
    The relay refused the counter of a message with a body (563) before anything went upstream: for MKE the receive
    window moved on while a long request was sent, for MTE the relay's ratchet is at another step. The client sends
    it once more with a new counter (MTE: on a pair made again).
    """


class RepairNeeded(RelayError):
    """The relay refused the pair or the client id with a re-pair code; the client pairs again before retrying."""


def _pair_id():
    return b64encode(secrets.token_bytes(16))


@attrs.define
class _Pair:
    """One pair's client-side state (the codec state is frozen; the holder moves it forward)."""

    state: object = attrs.field(repr=False)
    next_counter: int = 0
    #: The pool generation it belongs to (see ``_Pool.clear``).
    generation: int = 0

    @property
    def pair_id(self):
        return self.state.pair_id

    def message_keys(self):
        """The counter and keys for the next message, moving the held state forward."""
        if self.state.encode_type == "MKE":
            counter = self.next_counter
            self.next_counter += 1
            state, request_keys, response_keys = self.state.keys_for(counter)
            if state.position > self.state.position:
                self.state = state
        else:
            counter = self.state.position
            self.state, request_keys, response_keys = self.state.advance()
        return counter, request_keys, response_keys


#: Callers that may wait on one shared discovery or pairing (each an application request): beyond, 503 at once.
MAX_SHARED_WAITERS = 4096


class _Shared:
    """
    Runs one async operation on behalf of every concurrent caller; each caller gets its outcome. Each caller waits
    on a Deferred of its own, so one that is cancelled (its application went away) stops waiting alone: the
    operation goes on for the others.
    """

    def __init__(self, operation):
        self._operation = operation
        self._waiters = None

    def __call__(self):
        waiter = Deferred()
        if self._waiters is not None:
            if len(self._waiters) >= MAX_SHARED_WAITERS:
                raise RelayError(503, "too many requests are waiting for the relay's discovery or pairing")
            self._waiters.append(waiter)
        else:
            self._waiters = [waiter]
            ensureDeferred(self._operation()).addBoth(self._settle)
        return waiter

    def _settle(self, outcome):
        waiters = [waiter for waiter in self._waiters if not waiter.called]  # not cancelled meanwhile
        self._waiters = None
        failed = isinstance(outcome, Failure)
        if failed and not waiters:
            log.info("a shared discovery or pairing failed with nobody waiting: {error}", error=outcome.type.__name__)
        for waiter in waiters:
            waiter.errback(outcome) if failed else waiter.callback(outcome)


class _Pool:
    """
    Pairs of one encode type with one relay. The MKE pair is shared by concurrent requests; MTE pairs are lent to one
    request at a time, up to ``size`` of them, and waiters queue (at most ``size * max_waiting``, each for at most
    ``timeout`` seconds). ``clear`` starts a new generation: pairs lent out before it are forgotten when they return.

    A discarded pair's id, or that of a pairing that failed, is paired again by the next pairing, which replaces it at
    the relay: the relay holds no more pairs for this client than the pool, however often pairs are dropped or
    pairings abandoned (a relay keeps a pair the client dropped until PAIR_TTL, and refuses new ones past its
    per-client limit).
    """

    def __init__(self, encode_type, size, make_pair, clock, timeout, max_waiting=64):
        self._type = encode_type
        self._size = size
        self._make_pair = make_pair
        self._pair_shared = _Shared(self._new_shared_pair)
        self._clock = clock
        self._timeout = timeout
        self._shared = None
        self._idle = deque()
        self._count = 0
        self._generation = 0
        self._waiting = deque()
        self._max_waiting = size * max_waiting
        self._spare_ids = deque(maxlen=size)

    async def acquire(self):
        if self._type == "MKE":
            return self._shared if self._shared is not None else await self._pair_shared()
        if self._idle:
            return self._idle.popleft()
        if self._count < self._size:
            return await self._new_pair()
        if len(self._waiting) >= self._max_waiting:
            raise RelayError(503, "too many requests are waiting for an MTE pair")
        waiter = Deferred(self._forget_waiter)
        self._waiting.append(waiter)
        waiter.addTimeout(self._timeout, self._clock, onTimeoutCancel=_no_pair_in_time)
        return await waiter

    def _forget_waiter(self, waiter):
        if waiter in self._waiting:
            self._waiting.remove(waiter)

    async def _paired(self):
        """
        A new pair, under a spare id when there is one. The id is given back if pairing fails, a fresh one too: the
        relay may have stored a pairing the client gave up on (timed out, cancelled), and only pairing that id again
        replaces it there.
        """
        pair_id = self._spare_ids.popleft() if self._spare_ids else _pair_id()
        generation = self._generation
        try:
            return await self._make_pair(pair_id)
        except BaseException:
            if generation == self._generation:
                self._spare_ids.append(pair_id)
            raise

    async def _new_shared_pair(self):
        # Kept here rather than by the callers, who may all have gone by the time it is made.
        generation = self._generation
        pair = await self._paired()
        if generation == self._generation:
            self._shared = pair
        return pair

    async def _new_pair(self):
        generation = self._generation
        self._count += 1
        try:
            pair = await self._paired()
        except BaseException:
            if generation == self._generation:
                self._count -= 1
            raise
        pair.generation = generation
        return pair

    def release(self, pair):
        """Give an MTE pair back once the relay answered (so its next step follows this one)."""
        if self._type == "MKE" or pair.generation != self._generation:
            return
        if self._waiting:
            self._waiting.popleft().callback(pair)
        else:
            self._idle.append(pair)

    def discard(self, pair):
        """Forget a pair that is out of step with the relay, or that the relay no longer knows."""
        if self._type == "MKE":
            if self._shared is pair:
                self._shared = None
                self._spare_ids.append(pair.pair_id)
            return
        if pair.generation != self._generation:
            return
        self._count -= 1
        self._spare_ids.append(pair.pair_id)
        self._pair_for_next()

    def discard_idle(self):
        """Forget every MTE pair waiting in the pool (the relay lost them): the next requests pair afresh."""
        while self._idle:
            self._count -= 1
            self._spare_ids.append(self._idle.popleft().pair_id)

    def _pair_for_next(self):
        """
        Pair for the first waiter while a slot is free. The pair goes to whoever waits next if that waiter gave up
        meanwhile; a failure goes to that waiter, and the next one gets a pairing of its own.
        """
        if not self._waiting or self._count >= self._size:
            return
        waiter = self._waiting.popleft()

        def paired(pair):
            self.release(pair) if waiter.called else waiter.callback(pair)

        def failed(failure):
            if not waiter.called:
                waiter.errback(failure)
            self._pair_for_next()

        ensureDeferred(self._new_pair()).addCallbacks(paired, failed)

    def clear(self):
        self._generation += 1
        self._idle.clear()
        self._spare_ids.clear()
        self._shared = None
        self._count = 0
        # Pairs lent out before are dropped when they return: nothing else would start pairings for those waiting.
        while self._waiting and self._count < self._size:
            self._pair_for_next()


def _no_pair_in_time(result, timeout):
    raise RelayError(503, f"no MTE pair became free within {timeout} s")


def _late(result, timeout):
    # Whatever a cancelled request failed with, it failed because the relay was late.
    raise RelayError(504, f"the relay did not answer within {timeout} s")


def _header_pairs(headers):
    """``(name, value)`` byte pairs from a dict, a list of pairs, or a twisted ``Headers``."""
    if headers is None:
        return []
    if isinstance(headers, Headers):
        return [(n, v) for n, vs in headers.getAllRawHeaders() for v in vs]
    items = headers.items() if isinstance(headers, dict) else headers
    out = []
    for name, value in items:
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            out.append((_bytes(name), _bytes(v)))
    return out


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def _body_source(data):
    """A seekable file for ``data`` (None, bytes/str, or a seekable binary file) and its length."""
    if data is None:
        return None, 0
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, bytes | bytearray | memoryview):
        data = io.BytesIO(bytes(data))
    if not (hasattr(data, "read") and hasattr(data, "seek")):
        raise TypeError("data must be bytes, str or a seekable binary file")
    start = data.tell()
    data.seek(0, 2)
    length = data.tell() - start
    data.seek(start)
    return data, length


@attrs.frozen
class RelayResponse:
    """
    The upstream's answer as the relay sent it back, decoded. ``relay_error`` is True when the relay itself answered
    (its JSON error body is then the plain body).
    """

    code: int
    #: The standard phrase of ``code``: the one on the wire is not authenticated.
    phrase: bytes
    #: Opened headers may hold cookies and credentials: kept out of the repr.
    headers: Headers = attrs.field(repr=False)
    original: object = attrs.field(repr=False)
    #: The body transform that opens the sealed records (None when the body is plain or absent).
    decoder: object = attrs.field(repr=False, default=None)
    relay_error: bool = False

    def collect(self, write):
        """Call ``write(bytes)`` with each piece of the decoded body as it arrives; fires once it was complete."""
        decoder = self.decoder
        if decoder is None:
            return treq.collect(self.original, write)

        def feed(data):
            for piece in decoder.feed(data):
                write(piece)

        def finish(_):
            for piece in decoder.finish():
                write(piece)

        return treq.collect(self.original, feed).addCallback(finish)

    def content(self):
        """The whole decoded body (for small answers; use ``collect`` to stream large ones)."""
        chunks = []
        return self.collect(chunks.append).addCallback(lambda _: b"".join(chunks))

    def json(self):
        return self.content().addCallback(json.loads)


def _origin(relay_url):
    """``scheme://host[:port]`` of an http(s) URL, or ``ValueError``."""
    parts = urlsplit(relay_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("relay_url must be an http(s) URL")
    return f"{parts.scheme}://{parts.netloc}"


class Client:
    """
    Sends encoded requests to one relay.

    ``agent`` is an ``IAgent`` (give it a persistent ``HTTPConnectionPool``): every exchange goes through it as it is
    (no redirect following, cookie jar or content decoding may touch it; IPv6 literal hosts work, which treq's URL
    handling refuses). ``clock`` bounds every exchange by ``timeout`` seconds: until an encoded answer's headers
    (counted from the request body's last progress), and to the end of discovery and pairing answers (which are read
    whole, up to ``MAX_SMALL_ANSWER`` bytes); ``pin`` is the relay's Ed25519 public key or its SHA-256 fingerprint
    (raw bytes, or base64url as ``python -m mterelay.keygen`` prints it), checked at every pairing.
    """

    def __init__(self, relay_url, agent, clock, pool_size=25, pin=None, timeout=30.0):
        self.relay = _origin(relay_url)
        self._agent = agent
        self._clock = clock
        try:
            self._pin = b64decode(pin, field="pin") if isinstance(pin, str) else pin
        except CodecError:
            raise ValueError("pin is not base64url") from None
        self._timeout = timeout
        self._pools = {
            t: _Pool(t, pool_size, lambda pair_id, t=t: ensureDeferred(self.pair(t, pair_id)), clock, timeout)
            for t in ENCODE_TYPES
        }
        self._token = None
        self._discover_shared = _Shared(self._discover)
        self.identity = None

    def __repr__(self):
        return f"<Client relay={self.relay}>"

    def _url(self, path):
        return self.relay.encode("ascii") + path

    def _bounded(self, d):
        return d.addTimeout(self._timeout, self._clock, onTimeoutCancel=_late)

    def _note_token(self, response, discovery=False):
        """
        Take the client id an answer hands out; True if it was taken. The header is not authenticated: a malformed
        one is ignored, and only discovery takes a new id. Any other answer may only re-sign the id we hold (the
        relay's secret rotated), else anyone on the way could swap it and have every later request refused 566.
        """
        token = response.headers.getRawHeaders(CLIENT_ID_HEADER, [b""])[-1].decode("latin-1")
        client_id, _, signature = token.partition(".")
        try:
            check_id(client_id, "client id")
        except CodecError:
            return False
        if not _SIGNATURE.fullmatch(signature):
            return False
        if not discovery and (self._token is None or self._token.partition(".")[0] != client_id):
            return False
        self._token = token
        return True

    async def _client_token(self):
        """Discover the relay once (concurrent callers share the answer): a signed client id."""
        if self._token is None:
            await self._discover_shared()
        return self._token

    async def _exchange(self, sending):
        """The response to ``sending`` and its whole body (a small one: see _SmallBody), both within the timeout."""

        async def both():
            response = await sending
            return response, await _read_small(response)

        return await self._bounded(ensureDeferred(both()))

    def _read_off(self, response):
        """
        Read a refused answer's small body off so its connection can serve again: the body, or None. It fails only
        when cancelled: the caller went away, and must not go on to pair again and send its message once more.
        """
        return self._bounded(_read_small(response)).addErrback(
            lambda failure: failure if failure.check(CancelledError) else None
        )

    async def _discover(self):
        # No redirects here or in pairing: the relay is the configured origin, never wherever an answer points.
        response, _ = await self._exchange(self._agent.request(b"HEAD", self._url(b"/api/mte-relay")))
        if response.code != 200 or not self._note_token(response, discovery=True):
            raise RelayError(
                502, f"{self.relay} is not an mterelay relay (HEAD /api/mte-relay answered {response.code})"
            )

    async def pair(self, encode_type, pair_id=None):
        """
        Pair one new pair of ``encode_type`` with the relay (pools call this; exposed for warm-up). A ``pair_id``
        the client held before replaces that pair at the relay (a new one is drawn when None).
        """
        token = await self._client_token()
        pairing = ClientPairing.start(token.split(".", 1)[0], pair_id or _pair_id(), encode_type)
        body = json.dumps(
            [{"pairId": pairing.pair_id, "type": encode_type, "publicKey": b64encode(pairing.public_key)}]
        ).encode("ascii")
        headers = Headers({CLIENT_ID_HEADER: [token.encode("ascii")], b"content-type": [b"application/json"]})
        response, answer = await self._exchange(
            self._agent.request(b"POST", self._url(b"/api/mte-pair"), headers, FileBodyProducer(io.BytesIO(body)))
        )
        if response.code != 200:
            raise self._refusal(response.code, token)
        try:
            # Decoded here: json.loads would take UTF-16 and UTF-32 too.
            reply = json.loads(answer.decode("utf-8"))
            item = reply["pairs"][0]
            if item["pairId"] != pairing.pair_id:
                raise ValueError
            state = pairing.finish(
                b64decode(item["ciphertext"]),
                b64decode(item["signature"]),
                b64decode(reply["identity"]),
                self._pin,
            )
        except CodecError as e:
            raise RelayError(565, e.detail) from None
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise RelayError(565, "the relay's pairing answer is malformed") from None
        # Only a pairing that verified may hand us a re-signed client id.
        self._note_token(response)
        self.identity = reply["identity"]
        return _Pair(state)

    def _refusal(self, code, token):
        """
        The error for the relay's refusal ``code`` of a message or a pairing sent with ``token``. On 566 the relay no
        longer takes that client id (its secret was rotated, or another relay answers now): it is dropped with its
        pairs, so that the retry starts from a new one (for a client holding no pair, pairing is where it finds that
        out), unless it was dropped already and a new one taken meanwhile, which a late 566 must not drop too.
        """
        if code == 566 and self._token is not None and hmac.compare_digest(self._token, token):
            self._forget_client()
        return _answered_error(code)

    def _forget_client(self):
        """The relay no longer accepts our client id: start again with a new one and new pairs."""
        self._token = None
        for pool in self._pools.values():
            pool.clear()

    def request(self, method, url, headers=None, data=None, encode_type="MKE", encode_headers=True, encode_url=True):
        """
        Send one encoded request. ``url`` is a path (``/a?b``) or an absolute URL on the relay; ``encode_headers`` is
        True (every header is protected), False (none: every header, content-type included, stays visible), or a
        list of header names to protect (with content-type).

        A message the relay must be sent again is sent again once: after a re-pair code (the pair or client id is
        gone), after 562 (the relay could not open it under the keys it holds for the pair: it is paired again), or,
        for a message with a body, after 563 (an MKE counter fell behind the relay's window while it was being sent,
        an MTE step is not the relay's: the pair is paired again).

        @return: a Deferred firing with a ``RelayResponse`` (``relay_error`` True when the relay answered the message
            with an error of its own, e.g. 503 while its registry is unavailable), or failing with a ``RelayError``:
            400 for a header no block may hold (a name that is not a token, a control character in a value), 431 for
            headers a block cannot hold, 504 on timeout, the relay's code when a pairing the message needed was
            refused (503, 567, ...) or when a message sent again is refused again. Transport failures are Twisted's
            own: ``ConnectError`` or ``DNSLookupError`` when the relay cannot be reached (nothing was sent);
            ``ResponseNeverReceived``, ``ResponseFailed`` or ``RequestTransmissionFailed`` when the connection broke
            after sending began, so the message may have been delivered. (A pool with ``retryAutomatically``, the
            default, then sends a bodiless message again on a new connection and reports that attempt instead.)
        """
        return ensureDeferred(self._request(method, url, headers, data, encode_type, encode_headers, encode_url))

    async def _request(self, method, url, headers, data, encode_type, encode_headers, encode_url):
        if encode_type not in self._pools:
            raise ValueError("encode_type must be MKE or MTE")
        method = _bytes(method).upper()
        target = self._target(url)
        pairs = _header_pairs(headers)
        source, length = _body_source(data)
        start = source.tell() if source is not None else 0
        for attempt in (1, 2):
            try:
                return await self._send(method, target, pairs, source, length, encode_type, encode_headers, encode_url)
            except (RepairNeeded, CounterRefused) as e:
                log.info(
                    "relay {relay} refused the message ({code}); attempt {attempt}",
                    relay=self.relay,
                    code=e.code,
                    attempt=attempt,
                )
                if attempt == 2:
                    raise
                if source is not None:
                    source.seek(start)

    def _target(self, url):
        url = _bytes(url)
        if url.startswith(b"/"):
            # An empty query is no query: Twisted's agent drops a lone "?" from the request line, which would then
            # differ from the target the message is bound to (and an encoded URL would keep it from the upstream).
            path, mark, query = url.partition(b"?")
            return path if mark and not query else url
        parts = urlsplit(url.decode("latin-1"))
        if f"{parts.scheme}://{parts.netloc}" != self.relay:
            raise ValueError(f"{url!r} is not on the relay {self.relay}")
        return (parts.path or "/").encode("latin-1") + (b"?" + parts.query.encode("latin-1") if parts.query else b"")

    async def _send(self, method, target, pairs, source, length, encode_type, encode_headers, encode_url):
        protected, visible = _split_headers(pairs, encode_headers)
        try:
            plain_block = encode_header_block(protected)
        except UnencodableHeader as e:
            raise RelayError(400, str(e)) from None
        except ValueError as e:
            raise RelayError(431, str(e)) from None
        pool = self._pools[encode_type]
        pair = await pool.acquire()
        try:
            counter, request_keys, response_keys = pair.message_keys()
        except CodecError as e:
            # Used up (2^32 MKE messages or MTE steps): as the relay would answer (564), pair again.
            pool.discard(pair)
            raise RepairNeeded(564, e.detail) from None
        try:
            token = self._token
            if token is None or token.partition(".")[0] != pair.state.client_id:
                # A 566 for another request dropped our client id while this pair was being made under it.
                raise RepairNeeded(566, "the client id was dropped while this pair was being made")
            out = Headers({CLIENT_ID_HEADER: [token.encode("ascii")]})
            for name, value in visible:
                out.addRawHeader(name, value)
            has_body = source is not None
            relay = RelayHeader(
                pair.state.client_id,
                pair.pair_id,
                encode_type,
                counter,
                url=bool(encode_url),
                headers=encode_headers is not False,
                body=has_body,
            )
            binding = request_binding(method, None if encode_url else target, relay.flags)
            out.setRawHeaders(RELAY_HEADER, [relay.format().encode("ascii")])
            # Always a header block (empty when headers stay visible): it authenticates even a bodiless GET.
            block = request_keys.seal(HEADERS, plain_block, binding)
            out.setRawHeaders(ENCODED_HEADERS, [b64encode(block).encode("ascii")])
            if has_body and relay.headers:
                out.setRawHeaders(b"content-type", [b"application/octet-stream"])
            path = b"/" + b64encode(request_keys.seal(URL, target, binding)).encode("ascii") if encode_url else target
            # The wait for the answer counts from the body's last progress: a long upload is not a late relay.
            deadline = IdleDeadline(self._clock, self._timeout, _late)
            producer = None
            if has_body:
                producer = RequestBodyProducer(
                    source, length, request_keys.body_encoder(binding), progress=deadline.touch
                )
            response = await deadline.bound(self._agent.request(method, self._url(path), out, producer))
        except BaseException:
            # An MTE step that may or may not have reached the relay leaves the pair out of step for good.
            pool.discard(pair) if encode_type == "MTE" else pool.release(pair)
            raise
        entry = CODES.get(response.code)
        if response.headers.hasHeader(RELAY_HEADER):
            # The relay moved its side of the pair: the pair may carry the next request.
            pool.release(pair)
        elif entry is not None and entry.repair:
            # The pool and the client id take the refusal in before the read-off, which fails if the request is
            # cancelled meanwhile.
            pool.discard(pair)
            if response.code == 560:
                # The relay lost this pair, so most likely the others too (a restart without Redis).
                pool.discard_idle()
            refusal = self._refusal(response.code, token)
            await self._read_off(response)
            raise refusal
        else:
            if response.code == 562:
                # The relay holds other keys for this pair than ours: anyone who saw its ids (the client id is a
                # bearer token) can pair it again. Nothing went upstream: pair again under its id (which replaces
                # theirs) and send the message once more.
                pool.discard(pair)
                await self._read_off(response)
                raise RepairNeeded(562)
            # The relay answered itself (a JSON error). An MTE pair is dropped: whether the relay moved its ratchet
            # before failing cannot be told from here.
            pool.discard(pair) if encode_type == "MTE" else pool.release(pair)
            if response.code < 400:
                # Only errors come unsealed: anything else without x-mte-relay is someone else's answer.
                await self._read_off(response)
                raise CodecError(562, f"the relay's {response.code} answer is neither sealed nor an error")
            # Only a message with a body can have been refused for a window that moved on while it was sent (MKE),
            # or for a ratchet that someone else's pairing under its ids set back (MTE, whose pair was dropped above).
            # A bodiless one refused as a replay was most likely resent by the connection pool after the relay had
            # taken it (Twisted resends idempotent bodiless requests on a reused connection that broke off): sending
            # it again under a new counter would deliver it twice.
            if response.code == 563 and source is not None:
                await self._read_off(response)
                raise CounterRefused(563)
            code = response.code
            return RelayResponse(code, standard_phrase(code), response.headers, response, None, relay_error=True)
        try:
            opened = self._open_response(response, method, relay, response_keys)
        except CodecError:
            await self._read_off(response)
            raise
        # Only a genuine answer may hand us a re-signed client id.
        self._note_token(response)
        return opened

    def _open_response(self, response, method, relay, keys):
        """The decoded head of a sealed answer; its flags must be the only ones a genuine answer can have (562)."""
        answer = RelayHeader.parse(response.headers.getRawHeaders(RELAY_HEADER)[-1])
        if (answer.client_id, answer.pair_id, answer.counter) != (relay.client_id, relay.pair_id, relay.counter):
            raise CodecError(562, "the answer belongs to another message")
        has_body = method != b"HEAD" and response.code >= 200 and response.code not in (204, 304)
        sealed = response.headers.getRawHeaders(ENCODED_HEADERS)
        if not answer.headers or answer.url or answer.body != has_body or sealed is None:
            raise CodecError(562, "the answer's x-mte-relay flags are not those of a relay's answer")
        binding = response_binding(response.code, answer.flags)
        opened = decode_header_block(keys.open(HEADERS, b64decode(sealed[-1].decode("latin-1")), binding))
        # A relay seals every response header when the request sealed its own: visible ones are then not the
        # upstream's (a relay's own, or a man in the middle's) and are dropped.
        headers = filter_headers(response.headers) if not relay.headers else Headers()
        for name in {b"content-type", b"content-length"} | {n.lower() for n, _ in opened}:
            headers.removeHeader(name)
        for name, value in opened:
            headers.addRawHeader(name, value)
        # A streamed answer comes in framed records, each opened and handed on as it arrives.
        decoder = keys.body_decoder(binding, framed=answer.streaming) if has_body else None
        return RelayResponse(response.code, standard_phrase(response.code), headers, response, decoder)


def _split_headers(pairs, encode_headers):
    """
    ``(protected, visible)`` header pairs: every header (True), content-type and the named ones (a list), or none
    (False). Framing and ``x-mte-*`` headers are never sent. With some protected, the block names the visible ones
    (``x-mte-visible``): the relay passes on no other visible header.
    """
    if encode_headers is True:
        names = None
    elif encode_headers is False:
        names = frozenset()
    else:
        names = {b"content-type"} | {_bytes(n).lower() for n in encode_headers}
    protected, visible = [], []
    for name, value in pairs:
        lower = name.lower()
        if lower in _FRAMING or lower.startswith(b"x-mte-"):
            continue
        (protected if names is None or lower in names else visible).append((name, value))
    if names and visible:
        protected.append((VISIBLE_HEADERS, b",".join(sorted({name.lower() for name, _ in visible}))))
    return protected, visible


class _SmallBody(Protocol):
    """
    Reads a whole body of at most ``MAX_SMALL_ANSWER`` bytes into ``done``. A longer body, or cancelling ``done``
    (a timeout), drops the connection rather than reading on.
    """

    def __init__(self):
        self.done = Deferred(lambda _: self._drop())
        self._chunks = []
        self._size = 0

    def _drop(self):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data):
        if self.done.called:
            return
        self._size += len(data)
        if self._size > MAX_SMALL_ANSWER:
            self._drop()
            self.done.errback(RelayError(502, f"the relay's answer is longer than {MAX_SMALL_ANSWER} bytes"))
        else:
            self._chunks.append(data)

    def connectionLost(self, reason):
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _read_small(response):
    body = _SmallBody()
    response.deliverBody(body)
    return body.done


def _answered_error(code):
    """
    The error for a relay's refusal of ``code``. Its message is the error table's, never the answer's: that is
    unauthenticated text (anyone between client and relay could have written it), and it would end up in an
    outbound relay's answers and on terminals.
    """
    if code not in CODES:
        return RelayError(502, f"the relay answered {code}")
    if CODES[code].repair:
        return RepairNeeded(code)
    return RelayError(code, f"the relay answered {code}: {CODES[code].message}")


def _checked(convert, expected):
    """An argparse ``type`` that turns ``convert``'s refusal into a one-line usage error naming ``expected``."""

    def check(text):
        try:
            return convert(text)
        except (ValueError, CodecError):
            raise argparse.ArgumentTypeError(f"expected {expected}") from None

    return check


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m mterelay.client", description="Send one encoded request through an mterelay relay, like curl."
    )
    parser.add_argument(
        "url",
        type=_checked(lambda url: _origin(url) and url, "an http(s) URL"),
        help="the relay URL with the path to request, e.g. http://127.0.0.1:8080/anything",
    )
    parser.add_argument("-X", "--request", dest="method", default=None, help="method (default GET, or POST with -d)")
    parser.add_argument("-d", "--data", default=None, help="request body; @FILE reads it from FILE")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    parser.add_argument("--encode-type", choices=ENCODE_TYPES, default="MKE")
    parser.add_argument("--no-encode-headers", action="store_true", help="send every header visibly, content-type too")
    parser.add_argument("--no-encode-url", action="store_true", help="send the path and query visibly")
    parser.add_argument(
        "--pin",
        type=_checked(b64decode, "the relay's identity key or its fingerprint, in base64url"),
        help="the relay's identity key (base64url, as --pin=KEY: a key may start with -), refused when it differs",
    )
    parser.add_argument("-i", "--include", action="store_true", help="print the status and decoded headers first")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    for line in args.header:
        if ":" not in line:
            parser.error(f"-H {line!r} is not 'Name: value'")
    if args.data is not None and args.data.startswith("@"):
        try:
            args.data = open(args.data[1:], "rb")
        except OSError as e:
            parser.error(f"-d {args.data}: {e.strerror}")
    return args


async def _main(reactor, args, out):
    from twisted.web.client import Agent

    headers = [tuple(part.strip() for part in line.partition(":")[::2]) for line in args.header]
    data = args.data
    # Without resending: Twisted's pool sends a bodiless request again on a new connection when a kept-alive one
    # breaks, and reports that attempt's failure, so a relay that died after taking the message would show as one
    # never reached.
    pool = make_pool(reactor, resend=False)
    client = Client(args.url, Agent(reactor, pool=pool), reactor, pin=args.pin, timeout=args.timeout)
    try:
        response = await client.request(
            args.method or ("POST" if data is not None else "GET"),
            args.url,
            headers=headers,
            data=data,
            encode_type=args.encode_type,
            encode_headers=not args.no_encode_headers,
            encode_url=not args.no_encode_url,
        )

        def show(data):
            # As curl does: each piece shows as it arrives (an event stream), not once a buffer fills or at the end.
            out.write(data)
            out.flush()

        if args.include:
            head = [b"HTTP %d %s\r\n" % (response.code, response.phrase)]
            for name, values in response.headers.getAllRawHeaders():
                head += [name + b": " + value + b"\r\n" for value in values]
            show(b"".join(head) + b"\r\n")
        await response.collect(show)
    except RelayError as e:
        raise SystemExit(f"mterelay.client: error: {e.code} {e.detail}") from None
    except (ConnectError, DNSLookupError) as e:
        raise SystemExit(f"mterelay.client: error: cannot reach the relay: {e}") from None
    except (RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived):
        raise SystemExit("mterelay.client: error: the connection to the relay failed before the answer ended") from None
    except BrokenPipeError:
        # Whoever read the output stopped (``| head``): end quietly, as curl does, and point the output at /dev/null
        # so that the interpreter's last flush does not fail on the closed pipe as well.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise SystemExit(1) from None
    finally:
        await pool.closeCachedConnections()


def main(argv=None):
    import sys

    from twisted.internet.task import react

    args = _parse_args(argv)
    react(lambda reactor: ensureDeferred(_main(reactor, args, sys.stdout.buffer)))


if __name__ == "__main__":
    main()
