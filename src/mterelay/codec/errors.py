"""The codec's one error type: a ``RelayError`` limited to the codes a codec failure can mean."""

from mterelay.errors import RelayError

DECODE_FAILED = 562
REPLAY = 563
EXHAUSTED = 564
UNKNOWN_STATE = 560
PAIRING_FAILED = 565
BAD_HEADER = 569
BAD_VERSION = 568

_CODEC_CODES = frozenset({DECODE_FAILED, REPLAY, EXHAUSTED, UNKNOWN_STATE, PAIRING_FAILED, BAD_HEADER, BAD_VERSION})


class CodecError(RelayError):
    """
    A codec failure carrying its relay code (562 decode, 563 replay/window, 564 exhausted, 560 unknown state,
    565 pairing failed, 569 header, 568 version). ``detail`` names the failing field, never data or keys.
    """

    def __init__(self, code, detail=None):
        if code not in _CODEC_CODES:
            raise ValueError(f"{code} is not a codec error code")
        super().__init__(code, detail)
