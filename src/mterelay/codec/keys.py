"""
Per-message keys: sealing and opening of the url and header-block items and the streamed body records.

A ``MessageKeys`` holds one message key for one direction of one message. Every item is AES-256-GCM with a nonce made
of the item kind, final flag and record index (unique under a key used for one message only, as in the STREAM
construction) and associated data binding the protocol version, encode type, direction, counter, pair id, item kind
and a caller binding: the same for every record of a body, so a record costs no associated data of its own.
"""

import functools

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from mterelay.codec.errors import DECODE_FAILED, CodecError
from mterelay.codec.wire import ENCODE_TYPES, PROTOCOL_VERSION, lp

#: Plaintext bytes in every non-final body record; the final record holds fewer (possibly 0). 128 KiB: each record
#: costs one AEAD call with a fixed cost (context set-up, a fresh output buffer), which with 64 KiB records kept raw
#: AES-GCM itself to 0.87 of one call over a MiB (0.94 at 128 KiB); an encoder holds at most one record of input, a
#: decoder one record of input and one opened record held back.
RECORD_SIZE = 131072
TAG_SIZE = 16
C2S = 0
S2C = 1
URL = "url"
HEADERS = "headers"
_KINDS = {URL: 1, HEADERS: 2}
#: Hash algorithm objects are immutable descriptions: one serves every derivation instead of one built per call.
_SHA256 = hashes.SHA256()
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


@functools.lru_cache(maxsize=4096)
def message_heads(encode_type, pair_id):
    """
    What one pair's messages share in their associated data: the head of each direction (version, type, direction)
    and ``LP(pair_id)``; cached (bounded) because every message of a pair needs them.
    """
    kind = ENCODE_TYPES.index(encode_type) + 1
    return bytes((PROTOCOL_VERSION, kind, C2S)), bytes((PROTOCOL_VERSION, kind, S2C)), lp(pair_id.encode("ascii"))


def expand(key, info, length=32):
    """HKDF-Expand with SHA-256 (RFC 5869): ``length`` bytes from the pseudorandom key ``key``."""
    return HKDFExpand(_SHA256, length, info).derive(key)


def _nonce(kind, final, index):
    return bytes((kind, final, 0, 0)) + index.to_bytes(8, "big")


#: The first four nonce bytes of a body record: non-final, final.
_BODY_NONCES = (_nonce(_BODY, 0, 0)[:4], _nonce(_BODY, 1, 0)[:4])


class MessageKeys:
    """
    Seals or opens the items of one message in one direction; decoding failures raise ``CodecError(562)``.

    The message key is ``secret`` itself when ``info`` is None, else ``expand(secret, info)``, derived on first use,
    so a side that only ever uses one direction of a message (and a message without body, url or header items)
    derives no key it does not need. ``prefix`` is the associated data's version, type, direction, counter and
    ``LP(pair_id)``.
    """

    __slots__ = ("_secret", "_info", "_cipher", "_prefix", "counter", "direction")

    def __init__(self, secret, info, direction, counter, prefix):
        self._secret = secret
        self._info = info
        self._cipher = None
        self.counter = counter
        self.direction = direction
        self._prefix = prefix

    def __repr__(self):
        return f"<MessageKeys {('c2s', 's2c')[self.direction]} counter={self.counter}>"

    @property
    def _aead(self):
        cipher = self._cipher
        if cipher is None:
            key = self._secret if self._info is None else expand(self._secret, self._info)
            cipher = self._cipher = AESGCM(key)
            self._secret = self._info = None
        return cipher

    def _ad(self, kind, binding):
        return self._prefix + bytes((kind,)) + binding

    def seal(self, kind, plaintext, binding=b""):
        """Seal the ``url`` or ``headers`` item."""
        code = _KINDS[kind]
        return self._aead.encrypt(_nonce(code, 1, 0), plaintext, self._ad(code, binding))

    def open(self, kind, data, binding=b""):
        """Open the ``url`` or ``headers`` item, or raise ``CodecError(562)``."""
        code = _KINDS[kind]
        try:
            return self._aead.decrypt(_nonce(code, 1, 0), data, self._ad(code, binding))
        except InvalidTag:
            raise CodecError(DECODE_FAILED, f"{kind} item failed authentication") from None

    def body_encoder(self, binding=b"", record_size=RECORD_SIZE, framed=False):
        """
        A streaming body encoder (``feed(bytes) -> [bytes]``, ``finish() -> [bytes]``): fixed records, or framed
        ones (``framed``: a response body with the streaming flag, see ``FramedEncoder``).
        """
        return (FramedEncoder if framed else BodyEncoder)(self, binding, record_size)

    def body_decoder(self, binding=b"", record_size=RECORD_SIZE, framed=False):
        """
        A streaming body decoder (``feed(bytes) -> [bytes]``, ``finish() -> [bytes]``) that detects truncation: fixed
        records, or framed ones (``framed``, see ``FramedDecoder``).
        """
        return (FramedDecoder if framed else BodyDecoder)(self, binding, record_size)


class _Body:
    """What every body transform has: its AEAD call (sealing or opening), the body's associated data, the index of
    the next record, whether the stream has ended (finished or failed), and the input held for the next record."""

    __slots__ = ("_transform", "_ad", "_index", "_done", "_pending", "_pending_size")

    #: Whether records are opened (a decoder) rather than sealed.
    _OPENS = False

    def __init__(self, keys, binding):
        aead = keys._aead
        # The AEAD's encrypt or decrypt: (nonce, data, associated data) -> bytes.
        self._transform = aead.decrypt if self._OPENS else aead.encrypt
        self._ad = keys._ad(_BODY, binding)
        self._index = 0
        self._done = False
        self._pending = []
        self._pending_size = 0

    def _hold(self, rest, whole, unit):
        """
        Keep ``rest`` (a memoryview of part of the input ``whole``) for the record being gathered, of about ``unit``
        bytes. A rest of an immutable input that is at least half of it and a sixteenth of ``unit`` is held by
        reference (network reads of 64 KiB then cost one copy, the join, instead of two); anything else is copied
        into one growing buffer. So a record is held in at most 33 pieces however it is fed, a reference never keeps
        a large caller buffer alive for a small rest, and a mutable buffer may be reused by its caller.
        """
        pending = self._pending
        if whole.readonly and 2 * len(rest) >= len(whole) and 16 * len(rest) >= unit:
            pending.append(rest)
        elif pending and type(pending[-1]) is bytearray:
            pending[-1] += rest
        else:
            pending.append(bytearray(rest))
        self._pending_size += len(rest)

    def _check_open(self):
        if self._done:
            raise CodecError(DECODE_FAILED, "body stream already finished or failed")

    def _failed(self, reason="body record failed authentication"):
        self._done = True
        return CodecError(DECODE_FAILED, reason)


class _Records(_Body):
    """
    A streaming body transform: ``feed(bytes) -> [bytes]`` for every complete record so far, ``finish() -> [bytes]``
    for the final record. The encoder and the decoder differ only in their AEAD direction and record step, so one
    class does both (fewer calls per message: a message's fixed cost is what separates the codec from raw AES-GCM).

    Output is a list of records, each the AEAD's own ``bytes`` (what Twisted's transports take, with
    ``writeSequence``), so a record is never copied after it was sealed or opened. Whole records are read straight
    from the caller's buffer; only the rest that starts the next record is kept (see ``_hold``) and joined once.
    """

    __slots__ = ("_step",)

    def __init__(self, keys, binding, record_size):
        super().__init__(keys, binding)
        self._step = record_size + TAG_SIZE if self._OPENS else record_size

    @property
    def read_size(self):
        """The input size that makes exactly one record per ``feed`` (what a reader that can choose should read)."""
        return self._step

    def feed(self, data):
        """
        The records (a list of ``bytes``) of every complete non-final record of the input seen so far: sealed by an
        encoder, opened and authenticated by a decoder (``CodecError(562)`` if one fails; see ``BodyDecoder`` for the
        one it holds back). The rest is held.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        size = len(view)
        step = self._step
        transform, ad, index, prefix = self._transform, self._ad, self._index, _BODY_NONCES[0]
        out = []
        pos = 0
        try:
            if self._pending_size:
                pos = step - self._pending_size
                if size < pos:
                    if size:
                        self._hold(view, view, step)
                    return out
                self._pending.append(view[:pos])
                out.append(transform(prefix + index.to_bytes(8, "big"), b"".join(self._pending), ad))
                index += 1
                self._pending.clear()
                self._pending_size = 0
            end = pos + (size - pos) // step * step
            for start in range(pos, end, step):
                out.append(transform(prefix + index.to_bytes(8, "big"), view[start : start + step], ad))
                index += 1
        except InvalidTag:
            raise self._failed() from None
        finally:
            self._index = index
        if end < size:
            self._hold(view[end:], view, step)
        return out

    def finish(self):
        """
        The final record (the pending rest, shorter than a record), sealed or opened, as a one-item list; a decoder
        raises ``CodecError(562)`` if the stream was truncated or the final record fails.
        """
        self._check_open()
        self._done = True
        if self._OPENS and self._pending_size < TAG_SIZE:
            raise CodecError(DECODE_FAILED, "body truncated: no final record")
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        try:
            return [self._transform(_BODY_NONCES[1] + self._index.to_bytes(8, "big"), data, self._ad)]
        except InvalidTag:
            raise self._failed() from None


class BodyEncoder(_Records):
    """Cuts plaintext into records of exactly ``record_size`` bytes and a shorter final record."""

    __slots__ = ()

    def output_length(self, n):
        """The encoded size of an ``n``-byte body (so a relay can keep Content-Length)."""
        return encoded_length(n, self._step)


class BodyDecoder(_Records):
    """
    Opens records; a record of ``record_size + 16`` bytes is never final, so no look-ahead is needed.

    The newest opened record is held back until the next one opens, and the last one until the final record proved
    the body whole: so a reader never holds all of a body before its end was authenticated. Cut at a record boundary,
    with a length changed to match, a body would otherwise be all delivered before the forged end failed.
    """

    __slots__ = ("_held",)
    _OPENS = True

    def __init__(self, keys, binding, record_size):
        super().__init__(keys, binding, record_size)
        self._held = []

    def feed(self, data):
        out = super().feed(data)
        if out:
            self._held, out = out[-1:], self._held + out[:-1]
        return out

    def finish(self):
        held, self._held = self._held, []
        return held + super().finish()

    def output_length(self, m):
        """The plaintext size of an ``m``-byte encoded body, or ``CodecError(562)`` if none encodes to ``m``."""
        return decoded_length(m, self._step - TAG_SIZE)


#: The frame head before each record of a framed body: ``u8(final) || u32(length of the sealed record)``.
FRAME_HEAD = 5


class _Framed(_Body):
    """
    A framed body (a response with the streaming flag): records of any size up to ``record_size``, each sent as
    ``u8(final) || u32(len(sealed)) || sealed``, so that a record can go out as soon as its bytes arrived (server-sent
    events, long polls). The frame head is not authenticated by itself: the final flag is in the nonce and the length
    delimits the ciphertext, so a changed head makes the record fail.
    """

    __slots__ = ("_record_size",)

    def __init__(self, keys, binding, record_size):
        super().__init__(keys, binding)
        self._record_size = record_size

    def _apply(self, final, data):
        index, self._index = self._index, self._index + 1
        return self._transform(_BODY_NONCES[final] + index.to_bytes(8, "big"), data, self._ad)


class FramedEncoder(_Framed):
    """
    Seals every ``feed`` at once, in records of at most ``record_size`` bytes (nothing waits for a full record), and
    an empty final record at ``finish``. Output items alternate frame heads and sealed records.
    """

    __slots__ = ()

    def feed(self, data):
        self._check_open()
        view = memoryview(data).cast("B")
        out = []
        for start in range(0, len(view), self._record_size):
            out += self._frame(0, view[start : start + self._record_size])
        return out

    def finish(self):
        self._check_open()
        self._done = True
        return self._frame(1, b"")

    def _frame(self, final, data):
        """The frame head and the sealed record of ``data``."""
        sealed = self._apply(final, data)
        return [bytes((final,)) + len(sealed).to_bytes(4, "big"), sealed]


class FramedDecoder(_Framed):
    """
    Opens each record as soon as its frame is complete and releases it at once: a framed body has no length for a
    reader to count (it arrives chunked), so only the final record ends it, and a cut stream is broken off, never
    ended. Refuses (562) a frame head of an impossible length, an empty non-final record, anything after the final
    record, and a stream without one. Holds at most one incomplete frame.
    """

    __slots__ = ("_wanted", "_ended")
    _OPENS = True

    def __init__(self, keys, binding, record_size):
        super().__init__(keys, binding, record_size)
        # The start of an incomplete frame is held (``_hold``) and joined once ``_wanted`` bytes are in (the frame's
        # size, or its head's while that is incomplete): a frame fed a byte at a time costs one join, not one per feed.
        self._wanted = 0
        self._ended = False

    def feed(self, data):
        self._check_open()
        if self._pending:
            view = memoryview(data).cast("B")
            self._hold(view, view, self._record_size)
            if self._pending_size < self._wanted:
                return []
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
        view = memoryview(data).cast("B")
        size = len(view)
        out = []
        pos = 0
        wanted = FRAME_HEAD
        try:
            while pos < size:
                if self._ended:
                    raise self._failed("framed body: data after the final record")
                if size - pos < FRAME_HEAD:
                    break
                final, length = view[pos], int.from_bytes(view[pos + 1 : pos + FRAME_HEAD], "big")
                # A non-final record holds at least one byte: an empty one would only be a way to send nothing.
                if final > 1 or not TAG_SIZE + 1 - final <= length <= self._record_size + TAG_SIZE:
                    raise self._failed("framed body: impossible frame head")
                end = pos + FRAME_HEAD + length
                if end > size:
                    wanted = FRAME_HEAD + length
                    break
                out.append(self._apply(final, view[pos + FRAME_HEAD : end]))
                self._ended = final == 1
                pos = end
        except InvalidTag:
            raise self._failed() from None
        if pos < size:
            self._hold(view[pos:], view, self._record_size)
            self._wanted = wanted
        return out

    def finish(self):
        self._check_open()
        self._done = True
        if not self._ended:
            raise CodecError(DECODE_FAILED, "body truncated: no final record")
        return []
