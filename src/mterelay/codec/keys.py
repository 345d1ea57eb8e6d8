"""
Per-message keys: sealing and opening of the url and header-block items and the streamed body records.

A ``MessageKeys`` holds one message key for one direction of one message. Every item is AES-256-GCM with a nonce made
of the item kind and record index (unique under a key used for one message only) and associated data binding the
protocol version, encode type, direction, counter, pair id, item kind, record index, final flag and a caller binding.
"""

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mterelay.codec.errors import DECODE_FAILED, CodecError
from mterelay.codec.wire import ENCODE_TYPES, PROTOCOL_VERSION, lp

#: Plaintext bytes in every non-final body record; the final record holds fewer (possibly 0). 128 KiB: each record
#: costs one AEAD call with a fixed cost (context set-up, a fresh output buffer), which with 64 KiB records kept raw
#: AES-GCM itself to 0.87 of one call over a MiB (0.94 at 128 KiB); a stream still holds at most one record.
RECORD_SIZE = 131072
TAG_SIZE = 16
C2S = 0
S2C = 1
URL = "url"
HEADERS = "headers"
_KINDS = {URL: 1, HEADERS: 2}
_BODY = 3


def encoded_length(n, record_size=RECORD_SIZE):
    """Encoded size of an ``n``-byte body: one 16-byte tag per record, ``n // record_size + 1`` records."""
    return n + TAG_SIZE * (n // record_size + 1)


def decoded_length(m, record_size=RECORD_SIZE):
    """The plaintext size of an ``m``-byte encoded body, or ``CodecError(562)`` if no body encodes to ``m`` bytes."""
    full, rest = divmod(m, record_size + TAG_SIZE)
    if rest < TAG_SIZE:
        raise CodecError(DECODE_FAILED, "encoded body length is impossible")
    return full * record_size + rest - TAG_SIZE


#: The four ``x-mte-relay`` flags (url, headers, body, streaming) of a message that sets none.
NO_FLAGS = (False, False, False, False)


def _flags(flags):
    return bytes(1 if flag else 0 for flag in flags)


def request_binding(method, target=None, flags=NO_FLAGS):
    """
    The binding for every item of a request: its method, the visible path and query when the URL is not encoded,
    and the ``x-mte-relay`` flags (``RelayHeader.flags``), so that none of them can be changed in transit.
    """
    return b"req" + lp(method, b"" if target is None else b"\x01" + target, _flags(flags))


def response_binding(status, flags=NO_FLAGS):
    """The binding for every item of a response: its status code and its ``x-mte-relay`` flags."""
    return b"resp" + lp(b"%d" % status, _flags(flags))


def message_context(encode_type, counter, pair_id):
    """The associated-data fields one message shares in both directions (the direction byte goes after two bytes)."""
    return (
        bytes((PROTOCOL_VERSION, ENCODE_TYPES.index(encode_type) + 1))
        + counter.to_bytes(8, "big")
        + lp(pair_id.encode("ascii"))
    )


def _nonce(kind, index):
    return bytes((kind, 0, 0, 0)) + index.to_bytes(8, "big")


_BODY_NONCE = _nonce(_BODY, 0)[:4]


class MessageKeys:
    """
    Seals or opens the items of one message in one direction; decoding failures raise ``CodecError(562)``.

    ``derive_key`` returns the 32-byte message key; it is called on first use, so a side that only ever uses one
    direction of a message (and a message without body, url or header items) derives no key it does not need.
    """

    __slots__ = ("_derive", "_cipher", "_prefix", "counter", "direction")

    def __init__(self, derive_key, direction, counter, context):
        self._derive = derive_key
        self._cipher = None
        self.counter = counter
        self.direction = direction
        self._prefix = context[:2] + bytes((direction,)) + context[2:]

    def __repr__(self):
        return f"<MessageKeys {('c2s', 's2c')[self.direction]} counter={self.counter}>"

    @property
    def _aead(self):
        if self._cipher is None:
            self._cipher = AESGCM(self._derive())
            self._derive = None
        return self._cipher

    def _ad(self, kind, index, final, binding):
        return self._prefix + bytes((kind,)) + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00") + binding

    def seal(self, kind, plaintext, binding=b""):
        """Seal the ``url`` or ``headers`` item."""
        code = _KINDS[kind]
        return self._aead.encrypt(_nonce(code, 0), plaintext, self._ad(code, 0, True, binding))

    def open(self, kind, data, binding=b""):
        """Open the ``url`` or ``headers`` item, or raise ``CodecError(562)``."""
        code = _KINDS[kind]
        try:
            return self._aead.decrypt(_nonce(code, 0), data, self._ad(code, 0, True, binding))
        except InvalidTag:
            raise CodecError(DECODE_FAILED, f"{kind} item failed authentication") from None

    def body_encoder(self, binding=b"", record_size=RECORD_SIZE):
        """A streaming body encoder (``feed(bytes) -> [bytes]``, ``finish() -> [bytes]``)."""
        return BodyEncoder(self, binding, record_size)

    def body_decoder(self, binding=b"", record_size=RECORD_SIZE):
        """A streaming body decoder (``feed(bytes) -> [bytes]``, ``finish() -> [bytes]``) that detects truncation."""
        return BodyDecoder(self, binding, record_size)


class _Records:
    """
    Record bookkeeping shared by the encoder and the decoder: the pending input, the next index, finished state.

    Output is a list of records, each the AEAD's own ``bytes`` (what Twisted's transports take, with
    ``writeSequence``), so a record is never copied after it was sealed or opened. Whole records are read straight
    from the caller's buffer; only the rest that starts the next record is kept (see ``_hold``) and joined once.
    """

    __slots__ = ("_transform", "_head", "_tails", "_step", "_pending", "_pending_size", "_index", "_done")

    def __init__(self, transform, keys, binding, step):
        # The AEAD's encrypt or decrypt: (nonce, data, associated data) -> bytes.
        self._transform = transform
        # AD = head || u64(index) || final || binding; precomputed because a record's Python overhead adds up.
        self._head = keys._prefix + bytes((_BODY,))
        self._tails = (b"\x00" + binding, b"\x01" + binding)
        self._step = step
        self._pending = []
        self._pending_size = 0
        self._index = 0
        self._done = False

    @property
    def read_size(self):
        """The input size that makes exactly one record per ``feed`` (what a reader that can choose should read)."""
        return self._step

    def _check_open(self):
        if self._done:
            raise CodecError(DECODE_FAILED, "body stream already finished or failed")

    def _records(self, data):
        """Transform every complete non-final record of the pending input + ``data``; hold the rest (< a record)."""
        self._check_open()
        view = memoryview(data).cast("B")
        size = len(view)
        step = self._step
        out = []
        pos = 0
        if self._pending_size:
            pos = step - self._pending_size
            if size < pos:
                if size:
                    self._hold(view, view)
                return out
            self._pending.append(view[:pos])
            out.append(self._record(b"".join(self._pending), False))
            self._pending.clear()
            self._pending_size = 0
        end = pos + (size - pos) // step * step
        if end > pos:
            # _record inlined: a call per record is a measurable share of a record's cost at AES-GCM's speed.
            transform, head, tail, index = self._transform, self._head, self._tails[False], self._index
            for start in range(pos, end, step):
                nonce_index = index.to_bytes(8, "big")
                out.append(transform(_BODY_NONCE + nonce_index, view[start : start + step], head + nonce_index + tail))
                index += 1
            self._index = index
        if end < size:
            self._hold(view[end:], view)
        return out

    def _hold(self, rest, whole):
        """
        Keep ``rest`` (part of the input ``whole``) for the next record. A rest of an immutable input that is at
        least half of it and a sixteenth of a record is held by reference (network reads of 64 KiB then cost one
        copy, the join, instead of two); anything else is copied into one growing buffer. So a record is held in at
        most 33 pieces however it is fed, a reference never keeps a large caller buffer alive for a small rest, and
        a mutable buffer may be reused by its caller.
        """
        pending = self._pending
        if whole.readonly and 2 * len(rest) >= len(whole) and 16 * len(rest) >= self._step:
            pending.append(rest)
        elif pending and type(pending[-1]) is bytearray:
            pending[-1] += rest
        else:
            pending.append(bytearray(rest))
        self._pending_size += len(rest)

    def _record(self, data, final):
        index = self._index.to_bytes(8, "big")
        self._index += 1
        return self._transform(_BODY_NONCE + index, data, self._head + index + self._tails[final])

    def _final(self):
        self._check_open()
        self._done = True
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        return [self._record(data, True)]


class BodyEncoder(_Records):
    """Cuts plaintext into records of exactly ``record_size`` bytes and a shorter final record."""

    __slots__ = ()

    def __init__(self, keys, binding, record_size):
        super().__init__(keys._aead.encrypt, keys, binding, record_size)

    def feed(self, data):
        """Encoded records (a list of ``bytes``) for every complete ``record_size`` bytes seen so far."""
        return self._records(data)

    def finish(self):
        """The final record (the pending rest, shorter than a record), as a one-item list."""
        return self._final()

    def output_length(self, n):
        """The encoded size of an ``n``-byte body (so a relay can keep Content-Length)."""
        return encoded_length(n, self._step)


class BodyDecoder(_Records):
    """Opens records; a record of ``record_size + 16`` bytes is never final, so no look-ahead is needed."""

    __slots__ = ()

    def __init__(self, keys, binding, record_size):
        super().__init__(keys._aead.decrypt, keys, binding, record_size + TAG_SIZE)

    def _failed(self):
        self._done = True
        return CodecError(DECODE_FAILED, "body record failed authentication")

    def feed(self, data):
        """Plaintext (a list of ``bytes``) of every complete authenticated non-final record seen so far."""
        try:
            return self._records(data)
        except InvalidTag:
            raise self._failed() from None

    def finish(self):
        """Plaintext of the final record, as a one-item list; ``CodecError(562)`` if the stream was truncated."""
        if not self._done and self._pending_size < TAG_SIZE:
            self._done = True
            raise CodecError(DECODE_FAILED, "body truncated: no final record")
        try:
            return self._final()
        except InvalidTag:
            raise self._failed() from None

    def output_length(self, m):
        """The plaintext size of an ``m``-byte encoded body, or ``CodecError(562)`` if none encodes to ``m``."""
        return decoded_length(m, self._step - TAG_SIZE)
