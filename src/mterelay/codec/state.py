"""
Each endpoint's pair state (attrs, frozen, serializable) and the MKE / MTE key schedules that turn it into
per-message keys.

MKE: one chain of epoch keys per direction, ``K_{e+1} = HKDF-Expand(K_e, "mterelay/1 mke epoch")``; the message key of
counter ``c`` is ``HKDF-Expand(K_{c // EPOCH_SIZE}, "mterelay/1 mke message" || c)``. A state keeps its current epoch
key and the one before it; older keys are dropped (forward secrecy for past epochs).

MTE: one chain per direction; step ``n`` expands ``CK_n`` into the message key and ``CK_{n+1}``, which replaces it.
"""

import attrs

from mterelay.codec.errors import EXHAUSTED, REPLAY, UNKNOWN_STATE, CodecError
from mterelay.codec.keys import C2S, S2C, MessageKeys, expand, message_heads
from mterelay.codec.wire import ENCODE_TYPES, check_id

#: Messages per MKE epoch: counter c belongs to epoch c // EPOCH_SIZE.
EPOCH_SIZE = 1 << 16
#: Epochs per MKE pair (2^32 messages); a counter beyond them means the pair is exhausted.
MAX_EPOCHS = 1 << 16
#: How many epochs one message may move the window forward: bounds the work an unauthenticated counter can cause.
MAX_EPOCH_JUMP = 64
#: Steps per MTE pair.
MAX_STEPS = 1 << 32

_STATE_FORMAT = 1
_ROLES = {"client": 1, "relay": 2}
_KEY = 32
_MKE_MESSAGE = b"mterelay/1 mke message"


def _next_epoch(key):
    return expand(key, b"mterelay/1 mke epoch")


def _mte_step(chain_key):
    out = expand(chain_key, b"mterelay/1 mte step", 2 * _KEY)
    return out[:_KEY], out[_KEY:]


def _secret():
    return attrs.field(repr=False)


@attrs.frozen
class _PairState:
    """
    What one endpoint keeps for one pair. ``position`` is the current epoch (MKE) or the next step n (MTE);
    ``c2s``/``s2c`` the current epoch or chain keys; ``prev_*`` the previous epoch's keys (MKE only, may be absent).
    """

    client_id: str
    pair_id: str
    encode_type: str
    position: int
    c2s: bytes = _secret()
    s2c: bytes = _secret()
    prev_c2s: bytes | None = attrs.field(default=None, repr=False)
    prev_s2c: bytes | None = attrs.field(default=None, repr=False)

    def _moved(self, position, c2s, s2c, prev_c2s=None, prev_s2c=None):
        """This state at a new position with new keys (built directly: ``attrs.evolve`` costs microseconds)."""
        return type(self)(self.client_id, self.pair_id, self.encode_type, position, c2s, s2c, prev_c2s, prev_s2c)

    def _keys(self, counter, c2s, s2c, info):
        """
        ``(c2s, s2c)`` ``MessageKeys`` of one message: each direction's key is its secret (``info`` None) or
        ``expand(secret, info)``, derived on the direction's first use.
        """
        c2s_head, s2c_head, pair = message_heads(self.encode_type, self.pair_id)
        tail = counter.to_bytes(8, "big") + pair
        return (
            MessageKeys(c2s, info, C2S, counter, c2s_head + tail),
            MessageKeys(s2c, info, S2C, counter, s2c_head + tail),
        )

    def _mke(self, counter):
        if not isinstance(counter, int) or not 0 <= counter < 1 << 64:
            raise CodecError(REPLAY, "counter out of range")
        epoch = counter // EPOCH_SIZE
        if epoch == self.position:
            state, c2s, s2c = self, self.c2s, self.s2c
        elif epoch >= MAX_EPOCHS:
            raise CodecError(EXHAUSTED, "MKE epochs used up")
        elif epoch == self.position - 1 and self.prev_c2s is not None:
            state, c2s, s2c = self, self.prev_c2s, self.prev_s2c
        elif epoch < self.position:
            raise CodecError(REPLAY, "counter is older than the receive window")
        elif epoch - self.position > MAX_EPOCH_JUMP:
            raise CodecError(REPLAY, "counter is too far ahead of the receive window")
        else:
            prev_c2s, prev_s2c, c2s, s2c = self.prev_c2s, self.prev_s2c, self.c2s, self.s2c
            for _ in range(epoch - self.position):
                prev_c2s, prev_s2c, c2s, s2c = c2s, s2c, _next_epoch(c2s), _next_epoch(s2c)
            state = self._moved(epoch, c2s, s2c, prev_c2s, prev_s2c)
        return (state, *self._keys(counter, c2s, s2c, _MKE_MESSAGE + counter.to_bytes(8, "big")))

    def _mte(self, counter):
        if counter != self.position:
            raise CodecError(REPLAY, "MTE message out of order")
        if self.position >= MAX_STEPS:
            raise CodecError(EXHAUSTED, "MTE ratchet used up")
        c2s_message, c2s_next = _mte_step(self.c2s)
        s2c_message, s2c_next = _mte_step(self.s2c)
        state = self._moved(self.position + 1, c2s_next, s2c_next)
        return (state, *self._keys(counter, c2s_message, s2c_message, None))

    def to_bytes(self):
        """Compact versioned bytes for the registry (``load_state`` reads them back)."""
        fields = [
            bytes((_STATE_FORMAT, _ROLES[self._role], ENCODE_TYPES.index(self.encode_type) + 1)),
            _short(self.client_id.encode("ascii")),
            _short(self.pair_id.encode("ascii")),
            self.position.to_bytes(8, "big"),
            self.c2s,
            self.s2c,
        ]
        if self.prev_c2s is not None:
            fields += [self.prev_c2s, self.prev_s2c]
        return b"".join(fields)


def _short(data):
    return bytes((len(data),)) + data


@attrs.frozen
class ClientPairState(_PairState):
    """The client's pair state: it sends requests (c2s) and opens responses (s2c)."""

    _role = "client"

    def keys_for(self, counter):
        """MKE: ``(new_state, request_keys, response_keys)`` for a counter the client reserved."""
        if self.encode_type != "MKE":
            raise TypeError("keys_for is for MKE pairs; MTE pairs use advance()")
        return self._mke(counter)

    def advance(self):
        """MTE: ``(new_state, request_keys, response_keys)`` for the next ratchet step (the counter is the step)."""
        if self.encode_type != "MTE":
            raise TypeError("advance is for MTE pairs; MKE pairs use keys_for(counter)")
        return self._mte(self.position)


@attrs.frozen
class RelayPairState(_PairState):
    """The relay's pair state: it opens requests (c2s) and seals responses (s2c)."""

    _role = "relay"

    def keys_for(self, counter):
        """
        ``(new_state, request_keys, response_keys)`` for a request's counter: MKE checks the window, MTE requires
        the next step. Persist ``new_state`` only once the request opened.
        """
        return self._mke(counter) if self.encode_type == "MKE" else self._mte(counter)


_CLASSES = {code: cls for cls in (ClientPairState, RelayPairState) for code in (_ROLES[cls._role],)}


def load_state(data):
    """Read ``to_bytes`` output back; anything malformed or of an unknown format raises ``CodecError(560)``."""
    try:
        data = bytes(data)
        fmt, role, kind = data[0], data[1], data[2]
        if fmt != _STATE_FORMAT:
            raise ValueError
        pos = 3
        ids = []
        for _ in range(2):
            end = pos + 1 + data[pos]
            ids.append(check_id(data[pos + 1 : end].decode("ascii"), "id", UNKNOWN_STATE))
            pos = end
        position = int.from_bytes(data[pos : pos + 8], "big")
        keys = data[pos + 8 :]
        if len(keys) not in (2 * _KEY, 4 * _KEY) or kind not in (1, 2):
            raise ValueError
        chunks = [keys[i : i + _KEY] for i in range(0, len(keys), _KEY)] + [None, None]
        encode_type = ENCODE_TYPES[kind - 1]
        # No schedule reaches a position beyond these (the key schedules rely on it).
        if position >= MAX_EPOCHS if encode_type == "MKE" else position > MAX_STEPS:
            raise ValueError
        if encode_type == "MTE" and chunks[2] is not None:
            raise ValueError
        return _CLASSES[role](ids[0], ids[1], encode_type, position, *chunks[:4])
    except (IndexError, KeyError, ValueError, CodecError):
        raise CodecError(UNKNOWN_STATE, "stored pair state is unreadable") from None
