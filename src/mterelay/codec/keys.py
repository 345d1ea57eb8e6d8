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

#: Plaintext bytes in every non-final body record; the final record holds fewer (possibly 0).
RECORD_SIZE = 65536
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
    """Seals or opens the items of one message in one direction; decoding failures raise ``CodecError(562)``."""

    __slots__ = ("_aead", "_prefix", "counter", "direction")

    def __init__(self, key, direction, counter, context):
        self._aead = AESGCM(key)
        self.counter = counter
        self.direction = direction
        self._prefix = context[:2] + bytes((direction,)) + context[2:]

    def __repr__(self):
        return f"<MessageKeys {('c2s', 's2c')[self.direction]} counter={self.counter}>"

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
        """A streaming body encoder (``feed(bytes) -> bytes``, ``finish() -> bytes``)."""
        return BodyEncoder(self, binding, record_size)

    def body_decoder(self, binding=b"", record_size=RECORD_SIZE):
        """A streaming body decoder (``feed(bytes) -> bytes``, ``finish() -> bytes``) that detects truncation."""
        return BodyDecoder(self, binding, record_size)


class _Records:
    """Record bookkeeping shared by the encoder and the decoder: a bounded buffer, the next index, finished state."""

    __slots__ = ("_aead", "_head", "_tails", "_size", "_buffer", "_index", "_done")

    def __init__(self, keys, binding, size):
        self._aead = keys._aead
        # AD = head || u64(index) || final || binding; precomputed because a record's Python overhead adds up.
        self._head = keys._prefix + bytes((_BODY,))
        self._tails = (b"\x00" + binding, b"\x01" + binding)
        self._size = size
        self._buffer = bytearray()
        self._index = 0
        self._done = False

    def _nonce_ad(self, final):
        index = self._index.to_bytes(8, "big")
        self._index += 1
        return _BODY_NONCE + index, self._head + index + self._tails[final]

    def _record(self, data, final):
        return self._transform(self._aead, *self._nonce_ad(final), data)

    def _records(self, data, step):
        """
        Transform every complete non-final record in buffer + data; keep the rest (< ``step`` bytes) buffered.
        Whole records are read straight from ``data`` and written straight into one output buffer: only a record
        split across feeds is copied in, and the output is copied once into the returned bytes.
        """
        if self._done:
            raise CodecError(DECODE_FAILED, "body stream already finished or failed")
        view = memoryview(data)
        buffer = self._buffer
        taken = 0
        if buffer:
            taken = min(step - len(buffer), len(view))
            buffer += view[:taken]
        whole = taken + (len(view) - taken) // step * step
        count = (whole - taken) // step + (len(buffer) == step)
        if count < 2:
            # Zero or one record: the AEAD's own output is returned as is, with no copy.
            out = self._record(buffer if taken else view[:whole], False) if count else b""
            if taken and count:
                buffer.clear()
            buffer += view[whole:]
            return out
        out_step = step + self._growth
        out = bytearray(out_step * count)
        slots = memoryview(out)
        slot = 0
        if len(buffer) == step:
            self._record_into(buffer, slots[:out_step])
            buffer.clear()
            slot = 1
        for pos in range(taken, whole, step):
            self._record_into(view[pos : pos + step], slots[slot * out_step : (slot + 1) * out_step])
            slot += 1
        buffer += view[whole:]
        return bytes(out)

    def _record_into(self, data, slot):
        self._transform_into(self._aead, *self._nonce_ad(False), data, slot)

    def _final(self):
        if self._done:
            raise CodecError(DECODE_FAILED, "body stream already finished or failed")
        self._done = True
        return self._record(self._buffer, True)


class BodyEncoder(_Records):
    """Cuts plaintext into records of exactly ``record_size`` bytes and a shorter final record."""

    __slots__ = ()

    _growth = TAG_SIZE

    @staticmethod
    def _transform(aead, nonce, ad, data):
        return aead.encrypt(nonce, data, ad)

    @staticmethod
    def _transform_into(aead, nonce, ad, data, slot):
        aead.encrypt_into(nonce, data, ad, slot)

    def feed(self, data):
        """Encoded records for every complete ``record_size`` bytes seen so far."""
        return self._records(data, self._size)

    def finish(self):
        """The final record (the buffered rest, shorter than a record)."""
        return self._final()

    def output_length(self, n):
        """The encoded size of an ``n``-byte body (so a relay can keep Content-Length)."""
        return encoded_length(n, self._size)


class BodyDecoder(_Records):
    """Opens records; a record of ``record_size + 16`` bytes is never final, so no look-ahead is needed."""

    __slots__ = ()

    _growth = -TAG_SIZE

    def _transform(self, aead, nonce, ad, data):
        try:
            return aead.decrypt(nonce, data, ad)
        except InvalidTag:
            self._failed()

    def _transform_into(self, aead, nonce, ad, data, slot):
        try:
            aead.decrypt_into(nonce, data, ad, slot)
        except InvalidTag:
            self._failed()

    def _failed(self):
        self._done = True
        raise CodecError(DECODE_FAILED, "body record failed authentication") from None

    def feed(self, data):
        """Plaintext of every complete authenticated non-final record seen so far."""
        return self._records(data, self._size + TAG_SIZE)

    def finish(self):
        """Plaintext of the final record; ``CodecError(562)`` if the stream was truncated."""
        if not self._done and len(self._buffer) < TAG_SIZE:
            self._done = True
            raise CodecError(DECODE_FAILED, "body truncated: no final record")
        return self._final()

    def output_length(self, m):
        """The plaintext size of an ``m``-byte encoded body, or ``CodecError(562)`` if none encodes to ``m``."""
        return decoded_length(m, self._size)
