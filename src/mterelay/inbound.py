"""
The inbound role: hands out client ids, pairs clients, and relays encoded requests.

An encoded request is opened completely (URL, header block, and every body record) before anything is sent upstream,
so a forged, replayed or truncated message never reaches UPSTREAM: bodies up to ``VERIFY_IN_MEMORY`` bytes are
opened once into memory, larger ones are authenticated by a first pass over the spooled file and then opened again
while they stream upstream. The answer is sealed on the way back: its header block (content-type, and every header
when the client protected its own) and its body records, under the pair's relay-to-client keys bound to the request.
"""

import io
import json

from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH

from mterelay.codec import (
    CLIENT_ID_HEADER,
    ENCODED_HEADERS,
    HEADERS,
    IDENTITY_HEADER,
    RELAY_HEADER,
    URL,
    VERSION_HEADER,
    CodecError,
    RelayHeader,
    UnencodableHeader,
    b64decode,
    b64encode,
    decode_header_block,
    decoded_length,
    encode_header_block,
    visible_names,
    load_state,
    relay_pair,
    request_binding,
    response_binding,
)
from mterelay.errors import RelayError
from mterelay.registry import PairRecord
from mterelay.upstream import filter_headers, forward, standard_phrase, upstream_headers
from mterelay.web import (
    HELLO_PATH,
    MAX_PAIR_BODY,
    ORIGIN_FORM,
    PAIR_PATH,
    compile_routes,
    decoded_path,
    relay_header,
    send_error,
)

log = Logger()

#: MKE counters accepted behind the highest one seen on a pair: enough for thousands of concurrent requests per pair,
#: while the replay marks stay at 512 bytes per pair.
REPLAY_WINDOW = 4096
#: Encoded bodies up to this size are opened into memory in one pass; larger ones are verified, then streamed.
VERIFY_IN_MEMORY = 1 << 20
#: Pairs per pairing request (its bytes are bounded by web.MAX_PAIR_BODY; an X-Wing public key is 1216 bytes).
MAX_PAIRS_PER_REQUEST = 32
#: Statuses whose answers carry no body, whatever the upstream sent.
_NO_BODY = (204, 304)
_OCTETS = b"application/octet-stream"


def _bad_request(detail):
    return RelayError(400, detail)


def _read_bounded(request, limit, what):
    content = request.content
    content.seek(0)
    data = content.read(limit + 1)
    if len(data) > limit:
        raise RelayError(413, f"{what} is larger than {limit} bytes")
    return data


class Inbound:
    """
    The inbound handler the router calls for ``/api/mte-relay``, ``/api/mte-pair`` and every MTE route.

    Collaborators are injected: ``identity`` (a ``RelayIdentity``), ``registry`` (an ``IRegistry``), ``upstream``
    (an ``IUpstreamClient``), ``clock`` and ``signer`` (a ``ClientIdSigner``).
    """

    def __init__(self, settings, identity, registry, upstream, clock, signer, cooperator=task):
        self._settings = settings
        self._identity = identity
        self._registry = registry
        self._upstream = upstream
        self._clock = clock
        self._signer = signer
        self._cooperator = cooperator
        self._mte_routes = compile_routes(settings.mte_routes)
        self._upstream_base = settings.upstream.encode("ascii")

    def render(self, request):
        # The decoded path, as the router routes on (its body limit for /api/mte-pair is the pairing's).
        path = decoded_path(request.path)
        if path == HELLO_PATH:
            return self._hello(request)
        if path == PAIR_PATH:
            return self._async(request, self._pair)
        return self._async(request, self._relay)

    def head_refusal(self, headers, header):
        """
        The ``RelayError`` that refuses an encoded message (``header``: its ``x-mte-relay``) on its request head
        ``headers``, so that its body is never read, or None: a missing, forged or foreign ``x-mte-client-id`` (566,
        as step 1 of the order of work would), a missing header block (569), a body on a message that says it has
        none (562). Everything else needs the pair.
        """
        try:
            if self._verify_token(headers.getRawHeaders(CLIENT_ID_HEADER, [None])[-1]).client_id != header.client_id:
                return RelayError(566, "x-mte-client-id does not match x-mte-relay")
        except RelayError as e:
            return e
        if not headers.hasHeader(ENCODED_HEADERS):
            return RelayError(569, "x-mte-relay-eh header is missing")
        if not header.body:
            return CodecError(562, "the message has a body but says it is not encoded")
        return None

    def pair_lookup(self, header):
        """
        Start looking up the pair a message with a body names (``header``: its ``x-mte-relay``), on its head: a
        Deferred firing with its ``PairRecord``, or failing with the ``RelayError`` that refuses the message (560 for a
        pair this relay does not hold, 503 for a registry that cannot answer), before its body is read. ``_relay``
        takes the outcome from ``request.pair_lookup`` (the record, or that error) rather than looking again.
        """
        return self._registry.get_pair(header.client_id, header.pair_id)

    def _async(self, request, handler):
        """
        Run ``handler(request, gone)`` and answer a ``RelayError`` it raises (while nothing was sent yet); ``gone`` is
        a list that is not empty once the client went away.
        """
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def failed(failure):
            if gone or request.startedWriting:
                return
            if failure.check(RelayError):
                send_error(request, failure.value)
            else:
                # Type and place only: an exception's message may quote decoded data.
                frame = failure.frames[-1] if failure.frames else ("?", "?", 0)
                log.error(
                    "inbound request failed: {error} at {file}:{line}",
                    error=failure.type.__name__,
                    file=frame[1],
                    line=frame[2],
                )
                send_error(request, RelayError(502))

        ensureDeferred(handler(request, gone)).addErrback(failed)
        return server.NOT_DONE_YET

    def _verify_token(self, token):
        """The ``VerifiedClientId`` of an ``x-mte-client-id`` value (bytes or None), or ``BadClientId`` (566)."""
        return self._signer.verify(token.decode("ascii", "replace") if token else None)

    def _verify_client(self, request, required=True):
        token = request.getHeader(CLIENT_ID_HEADER)
        if token is None and not required:
            return self._signer.issue()
        verified = self._verify_token(token)
        if verified.resigned:
            request.setHeader(CLIENT_ID_HEADER, verified.token.encode("ascii"))
        return verified

    def _hello(self, request):
        """``HEAD /api/mte-relay``: issue or refresh the client id, and say who this relay is."""
        if request.method not in (b"HEAD", b"GET"):
            raise RelayError(400, "/api/mte-relay takes HEAD or GET")
        verified = self._verify_client(request, required=False)
        request.setHeader(CLIENT_ID_HEADER, verified.token.encode("ascii"))
        request.setHeader(IDENTITY_HEADER, self._identity.public_b64().encode("ascii"))
        request.setHeader(VERSION_HEADER, b"1")
        request.setHeader(b"content-length", b"0")
        return b""

    async def _pair(self, request, gone):
        """``POST /api/mte-pair``: pair every requested pair id through the codec and store the relay's side."""
        if request.method != b"POST":
            raise RelayError(400, "/api/mte-pair takes POST")
        client_id = self._verify_client(request).client_id
        try:
            # Decoded here: json.loads would take UTF-16 and UTF-32 too.
            items = json.loads(_read_bounded(request, MAX_PAIR_BODY, "pair request").decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _bad_request("body is not JSON") from None
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_PAIRS_PER_REQUEST:
            raise _bad_request(f"body must be a JSON array of 1 to {MAX_PAIRS_PER_REQUEST} pair requests")
        now = self._clock.seconds()
        records, replies = [], []
        # Every item is checked and paired before anything is stored: a refused item stores nothing.
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _bad_request(f"[{i}] is not an object")
            for field in ("pairId", "type", "publicKey"):
                if not isinstance(item.get(field), str):
                    raise _bad_request(f"[{i}].{field} is missing or not a string")
            # A second item for the same id would replace the first, whose keys the client would then hold in vain.
            if any(record.pair_id == item["pairId"] for record in records):
                raise _bad_request(f"[{i}].pairId repeats an earlier item's")
            try:
                public_key = b64decode(item["publicKey"], field=f"[{i}].publicKey")
                state, reply = relay_pair(self._identity, client_id, item["pairId"], item["type"], public_key)
            except CodecError as e:
                raise _bad_request(f"[{i}]: {e.detail}") from None
            records.append(PairRecord(client_id, item["pairId"], item["type"], state.to_bytes(), 0, now, now))
            replies.append(
                {
                    "pairId": item["pairId"],
                    "ciphertext": b64encode(reply.ciphertext),
                    "signature": b64encode(reply.signature),
                }
            )
        stored = []
        try:
            for record in records:
                await self._registry.create_pair(record)
                stored.append(record)
        except Exception:
            # The client never gets these pairs' keys: they must not count against its limit for PAIR_TTL.
            for record in stored:
                await self._registry.delete_pair(record.client_id, record.pair_id)
            raise
        body = json.dumps({"identity": self._identity.public_b64(), "pairs": replies}).encode("ascii")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    async def _relay(self, request, gone):
        """Open an encoded request completely, claim it in the registry, forward it upstream, and seal the answer."""
        header = relay_header(request)
        if self._verify_client(request).client_id != header.client_id:
            raise RelayError(566, "x-mte-client-id does not match x-mte-relay")
        registry = self._registry
        lookup = getattr(request, "pair_lookup", None)
        record = await (lookup if lookup is not None else registry.get_pair(header.client_id, header.pair_id))
        if isinstance(record, RelayError):
            raise record
        # Everything is opened before the registry changes: a forged message neither burns a counter nor moves a
        # ratchet, and nothing unauthenticated goes upstream.
        try:
            opened = await self._open(request, header, record)
        except CodecError:
            if not registry.forget(header.client_id, header.pair_id):
                raise
            # The registry answered from a copy. Only a pair created again since (through another relay, same ids,
            # new keys, any epoch) can open what the copy could not: epoch keys only ever derive forward.
            stored = await registry.get_pair(header.client_id, header.pair_id)
            if stored.created == record.created:
                raise
            record = stored
            opened = await self._open(request, header, record)
        state, new_state, response_keys, target, headers, body_transform = opened

        if header.encode_type == "MKE":
            seen = registry.mark_seen(
                header.client_id, header.pair_id, header.counter, REPLAY_WINDOW, created=record.created
            )
            if not await seen:
                raise CodecError(563, "message counter was already used or is outside the window")
            if new_state is not state:
                # Best effort: another instance that moved the window first stored the same or a later one.
                await registry.swap_state(
                    header.client_id, header.pair_id, record.version, new_state.to_bytes(), created=record.created
                )
        elif not await registry.swap_state(
            header.client_id, header.pair_id, record.version, new_state.to_bytes(), created=record.created
        ):
            raise CodecError(563, "this MTE step was already used")
        if gone:
            return

        def seal_response(response, request):
            return self._seal_response(request, response, header, response_keys)

        await forward(
            request,
            self._upstream,
            self._upstream_base + target,
            self._upstream_request_headers(request, headers, header),
            self._clock,
            self._settings.upstream_timeout,
            request_transform=body_transform,
            prepare_response=seal_response,
        )

    async def _open(self, request, header, record):
        """
        Open the request with the pair ``record``: ``(state, new_state, response_keys, target, headers,
        body_transform)``, or a ``CodecError`` (562 when an item does not open).
        """
        if record.encode_type != header.encode_type:
            raise CodecError(560, f"pair is not an {header.encode_type} pair")
        state = load_state(record.state)
        new_state, request_keys, response_keys = state.keys_for(header.counter)
        target, binding = self._open_target(request, header, request_keys)
        headers = self._open_headers(request, header, request_keys, binding)
        body_transform = await self._open_body(request, header, request_keys, binding)
        return state, new_state, response_keys, target, headers, body_transform

    def _open_target(self, request, header, keys):
        """The upstream path and query, and the binding every item of this request is sealed with."""
        if header.url:
            sealed = b64decode(request.path[1:].decode("latin-1"), 562, "encoded URL")
            if request.uri != request.path:
                raise CodecError(562, "an encoded URL carries no visible query")
            binding = request_binding(request.method, flags=header.flags)
            target = keys.open(URL, sealed, binding)
            if not ORIGIN_FORM.fullmatch(target):
                raise CodecError(562, "the URL item is not an origin-form path and query")
        else:
            target = request.uri
            binding = request_binding(request.method, target, header.flags)
        path = decoded_path(target.split(b"?", 1)[0])
        if self._mte_routes is not None and not self._mte_routes.fullmatch(path):
            raise RelayError(404)
        return target, binding

    def _open_headers(self, request, header, keys, binding):
        """
        The opened header block: every request has one, the item that authenticates even a bodiless GET; empty when
        the message's headers flag is 0 (562 otherwise, as the protocol says).
        """
        sealed = request.getHeader(ENCODED_HEADERS)
        if sealed is None:
            raise RelayError(569, "x-mte-relay-eh header is missing")
        opened = decode_header_block(
            keys.open(HEADERS, b64decode(sealed.decode("latin-1"), 562, "x-mte-relay-eh"), binding)
        )
        if opened and not header.headers:
            raise CodecError(562, "the header block must be empty when the headers flag is 0")
        return opened

    async def _open_body(self, request, header, keys, binding):
        """
        Authenticate the whole body before anything goes upstream; return the transform that opens it while it
        streams (None when it was opened into memory here, or when there is no body).
        """
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        if not header.body:
            if size:
                raise CodecError(562, "the message has a body but says it is not encoded")
            return None
        decoded_length(size)  # an impossible length fails before any decryption
        decoder = keys.body_decoder(binding)
        if size <= VERIFY_IN_MEMORY:
            plain = decoder.feed(content.read()) + decoder.finish()
            request.content = io.BytesIO(b"".join(plain))
            return None

        def verify():
            # One record per turn of the reactor: other requests go on while a large body is checked.
            while data := content.read(decoder.read_size):
                decoder.feed(data)
                yield None
            decoder.finish()

        await self._cooperator.cooperate(verify()).whenDone()
        content.seek(0)
        return keys.body_decoder(binding)

    def _upstream_request_headers(self, request, opened, header):
        """
        The visible end-to-end headers, overlaid by the opened header block, for the upstream request. With the
        headers flag 1 only the visible headers the block names (``x-mte-visible``) pass: others were added on the way.
        """
        if not header.headers:
            return upstream_headers(request, self._settings.headers, opened)
        # With a header block the visible content-type only describes the sealed records.
        return upstream_headers(request, self._settings.headers, opened, (b"content-type",), visible_names(opened))

    def _seal_response(self, request, response, header, keys):
        """
        Seal the upstream answer's head: move the protected headers into the sealed block (every end-to-end header
        when the request came with a header block, else content-type), and return the body encoder. Content-Length
        of a body is never among them (the agent keeps it out of ``response.headers``, and the client computes the
        plaintext length from the encoded one); that of an answer without body (HEAD, 304) is, when protected.
        """
        status = response.code
        # The upstream's reason phrase is free text outside the seal (it could carry data, and be rewritten on the
        # way): the sealed answer goes out with the standard phrase of its status.
        response.phrase = standard_phrase(status)
        has_body = request.method != b"HEAD" and status not in _NO_BODY and status >= 200
        end_to_end = filter_headers(response.headers)
        if header.headers:
            # Lower-case names, whatever case the upstream wrote (Twisted only keeps a canonical one): the same block
            # whichever headers flag the request had.
            protected = [(name.lower(), value) for name, values in end_to_end.getAllRawHeaders() for value in values]
        else:
            # The Content-Length of an answer without body describes the body not sent: the client drops a visible
            # one (anyone could have written it), so it travels sealed whatever the request's headers flag.
            names = (b"content-type",) if has_body else (b"content-type", b"content-length")
            protected = [(name, value) for name in names for value in end_to_end.getRawHeaders(name, [])]
        for name in {name.lower() for name, _ in protected}:
            response.headers.removeHeader(name)
        if has_body:
            response.headers.setRawHeaders(b"content-type", [_OCTETS])
        relay = RelayHeader(
            header.client_id,
            header.pair_id,
            header.encode_type,
            header.counter,
            headers=True,
            body=has_body,
            streaming=has_body and response.length is UNKNOWN_LENGTH,
        )
        binding = response_binding(status, relay.flags)
        try:
            block = encode_header_block(protected)
        except UnencodableHeader:
            # Its text names the header, which would cross unsealed: only what kind of header it is.
            raise RelayError(561, "the upstream answer has a header no block may hold (a name that is not a token,"
                                  " or a control character in a value)") from None
        except ValueError as e:
            raise RelayError(561, f"the upstream answer cannot be encoded: {e}") from None
        sealed = keys.seal(HEADERS, block, binding)
        request.setHeader(RELAY_HEADER, relay.format().encode("ascii"))
        request.setHeader(ENCODED_HEADERS, b64encode(sealed).encode("ascii"))
        if not has_body:
            return None
        # A streamed answer goes out in framed records, each as soon as the upstream sent its bytes.
        return keys.body_encoder(binding, framed=relay.streaming)
