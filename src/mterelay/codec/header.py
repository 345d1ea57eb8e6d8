"""
The ``x-mte-relay`` header (parsed and formatted only here) and the plain content of the encoded header block.

``x-mte-relay: <version>,<client id>,<pair id>,<MKE|MTE>,<counter>,<url>,<headers>,<body>,<streaming>`` where the
last four fields are ``0`` or ``1``. A wrong version or encode type raises ``CodecError(568)``, anything else
malformed ``CodecError(569)``.
"""

import json
import re

import attrs

from mterelay.codec.errors import BAD_HEADER, BAD_VERSION, DECODE_FAILED, CodecError
from mterelay.codec.wire import PROTOCOL_VERSION, check_id, check_type

NAME = "x-mte-relay"
#: The protocol's HTTP header names, for everything that reads or writes them (relay roles and clients alike).
RELAY_HEADER = NAME.encode("ascii")
ENCODED_HEADERS = b"x-mte-relay-eh"
CLIENT_ID_HEADER = b"x-mte-client-id"
IDENTITY_HEADER = b"x-mte-relay-identity"
VERSION_HEADER = b"x-mte-relay-version"
#: Longest accepted x-mte-relay value (ids are at most 64 characters, the counter 20 digits).
MAX_LENGTH = 200
#: Most [name, value] pairs in one header block.
MAX_HEADER_PAIRS = 256
#: Longest plain header block, in bytes: sealed (16 bytes more) and base64url-encoded (4/3 as long), its
#: ``x-mte-relay-eh`` line is at most 16,038 bytes, within the 16 KiB line that Twisted's HTTP client and server read.
MAX_HEADER_BLOCK = 12000

_COUNTER = re.compile(r"0|[1-9][0-9]{0,19}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Anything but what RFC 9110 5.5 allows in a field value (HTAB, SP, VCHAR, obs-text): control characters would
#: reach the upstream as a head that HTTP parsers refuse, or read differently from the relay.
_FORBIDDEN_IN_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
_FLAGS = {"0": False, "1": True}
#: A well-formed value of this version in one match (every message carries one); anything else takes the field by
#: field checks, which name what is wrong.
_WELL_FORMED = re.compile(
    rb"%d,([A-Za-z0-9_-]{16,64}),([A-Za-z0-9_-]{16,64}),(MKE|MTE),(0|[1-9][0-9]{0,19}),([01]),([01]),([01]),([01])"
    % PROTOCOL_VERSION
)


def _flag(value):
    if value not in _FLAGS:
        raise CodecError(BAD_HEADER, f"{NAME} flags must be 0 or 1")
    return _FLAGS[value]


@attrs.frozen
class RelayHeader:
    """What one encoded message says about itself; ``counter`` is the MKE counter or the MTE step."""

    client_id: str
    pair_id: str
    encode_type: str
    counter: int
    url: bool = False
    headers: bool = False
    body: bool = False
    streaming: bool = False
    version: int = PROTOCOL_VERSION

    @property
    def flags(self):
        """``(url, headers, body, streaming)``, as bound into every item of the message."""
        return (self.url, self.headers, self.body, self.streaming)

    def format(self):
        """The header value."""
        flags = ",".join("1" if f else "0" for f in self.flags)
        return f"{self.version},{self.client_id},{self.pair_id},{self.encode_type},{self.counter},{flags}"

    @classmethod
    def parse(cls, value):
        """Parse a header value (str or bytes); malformed values raise ``CodecError`` 569 (568 for version/type)."""
        if isinstance(value, bytes):
            match = _WELL_FORMED.fullmatch(value)
            if match is not None and int(match[4]) < 1 << 64:
                client_id, pair_id, encode_type, counter, *flags = match.groups()
                return cls(
                    client_id.decode("ascii"),
                    pair_id.decode("ascii"),
                    encode_type.decode("ascii"),
                    int(counter),
                    *(flag == b"1" for flag in flags),
                )
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or len(value) > MAX_LENGTH:
            raise CodecError(BAD_HEADER, f"{NAME} is missing or too long")
        fields = [f.strip(" \t") for f in value.split(",")]
        if len(fields) != 9:
            raise CodecError(BAD_HEADER, f"{NAME} must have 9 comma-separated fields")
        version, client_id, pair_id, encode_type, counter, *flags = fields
        if not version.isdigit() or not version.isascii():
            raise CodecError(BAD_HEADER, f"{NAME} version is not a number")
        if version != str(PROTOCOL_VERSION):
            raise CodecError(BAD_VERSION, f"{NAME} version is not supported")
        check_id(client_id, "client id")
        check_id(pair_id, "pair id")
        check_type(encode_type)
        if not _COUNTER.fullmatch(counter) or int(counter) >= 1 << 64:
            raise CodecError(BAD_HEADER, f"{NAME} counter is not a 64-bit decimal")
        return cls(client_id, pair_id, encode_type, int(counter), *map(_flag, flags))


#: One compact encoder for every header block (``json.dumps`` with separators builds a new encoder per call).
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def is_token(name):
    """Whether the text ``name`` is an HTTP token (RFC 9110 5.6.2), as every header name must be."""
    return _TOKEN.fullmatch(name) is not None


def is_field_value(text):
    """Whether ``text`` (header bytes read as Latin-1) holds only what RFC 9110 5.5 allows in a field value."""
    return _FORBIDDEN_IN_VALUE.search(text) is None


class UnencodableHeader(ValueError):
    """A header whose name is not an HTTP token or whose value holds a control character (named, value left out)."""


def encode_header_block(pairs):
    """
    The plain header-block item: a JSON array of ``[name, value]`` strings, bytes mapped one-to-one by Latin-1 so
    every header byte survives; repeated names (several Set-Cookie) stay separate pairs, in order.

    Raises ``UnencodableHeader`` for a pair ``decode_header_block`` would refuse, and ``ValueError`` for more than
    ``MAX_HEADER_PAIRS`` pairs or a block over ``MAX_HEADER_BLOCK`` bytes: the other side would refuse to open it,
    so it is refused before anything is sent.
    """
    if len(pairs) > MAX_HEADER_PAIRS:
        raise ValueError(f"{len(pairs)} headers are more than the {MAX_HEADER_PAIRS} a header block holds")
    texts = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in pairs]
    for name, value in texts:
        if not is_token(name):
            raise UnencodableHeader(f"header name {name[:40]!r} is not an HTTP token")
        if not is_field_value(value):
            raise UnencodableHeader(f"header {name} has a control character in its value")
    block = _COMPACT.encode(texts)
    if len(block) > MAX_HEADER_BLOCK:
        raise ValueError(f"the headers take {len(block)} bytes, more than the {MAX_HEADER_BLOCK} a header block holds")
    return block.encode("ascii")


#: The block entry that names, as a comma list, the end-to-end headers a request sends visibly beside its block.
VISIBLE_HEADERS = b"x-mte-visible"


def visible_names(pairs):
    """The lower-case header names that the ``x-mte-visible`` entries of an opened block list (none: an empty set)."""
    return {
        name.strip().lower()
        for entry, value in pairs
        if entry.lower() == VISIBLE_HEADERS
        for name in value.split(b",")
        if name.strip()
    }


def decode_header_block(data):
    """
    The ``[(name, value)]`` byte pairs of an opened header block, or ``CodecError(562)`` if it is malformed: each
    pair a two-item list, names HTTP tokens (RFC 9110 5.6.2), values of the characters RFC 9110 5.5 allows (no CR,
    LF, NUL or other control character), so that no decoded header can split or forge another; the JSON is UTF-8.
    """
    if len(data) > MAX_HEADER_BLOCK:
        raise CodecError(DECODE_FAILED, f"header block is over {MAX_HEADER_BLOCK} bytes")
    try:
        # Decoded here: json.loads would take UTF-16 and UTF-32 bytes too.
        pairs = json.loads(bytes(data).decode("utf-8"))
        if isinstance(pairs, list) and len(pairs) > MAX_HEADER_PAIRS:
            raise CodecError(DECODE_FAILED, f"header block holds more than {MAX_HEADER_PAIRS} pairs")
        if not isinstance(pairs, list):
            raise ValueError
        result = []
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError
            name, value = pair
            if not isinstance(name, str) or not isinstance(value, str) or not _TOKEN.fullmatch(name):
                raise ValueError
            if not is_field_value(value):
                raise ValueError
            result.append((name.encode("latin-1"), value.encode("latin-1")))
        return result
    except (ValueError, TypeError, UnicodeError, RecursionError):
        raise CodecError(DECODE_FAILED, "header block is not a list of [name, value] header pairs") from None
