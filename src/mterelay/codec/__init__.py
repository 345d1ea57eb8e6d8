"""
The mterelay codec: X-Wing pairing signed by the relay's Ed25519 identity, the MKE and MTE encodings, streamed body
records, serializable pair state and the ``x-mte-relay`` header. Pure: no I/O, no reactor. See docs/protocol.rst.
"""

from mterelay.codec.errors import CodecError
from mterelay.codec.header import (
    CLIENT_ID_HEADER,
    ENCODED_HEADERS,
    IDENTITY_HEADER,
    MAX_HEADER_BLOCK,
    MAX_HEADER_PAIRS,
    RELAY_HEADER,
    VERSION_HEADER,
    RelayHeader,
    UnencodableHeader,
    decode_header_block,
    encode_header_block,
    is_field_value,
    is_token,
    visible_names,
    VISIBLE_HEADERS,
)
from mterelay.codec.identity import RelayIdentity, fingerprint
from mterelay.codec.keys import (
    HEADERS,
    RECORD_SIZE,
    URL,
    MessageKeys,
    decoded_length,
    encoded_length,
    request_binding,
    response_binding,
)
from mterelay.codec.pairing import ClientPairing, PairReply, relay_pair
from mterelay.codec.state import EPOCH_SIZE, ClientPairState, RelayPairState, load_state
from mterelay.codec.wire import ENCODE_TYPES, PROTOCOL_VERSION, b64decode, b64encode, check_id

__all__ = [
    "CodecError",
    "RelayHeader",
    "encode_header_block",
    "UnencodableHeader",
    "is_field_value",
    "is_token",
    "visible_names",
    "VISIBLE_HEADERS",
    "decode_header_block",
    "MAX_HEADER_PAIRS",
    "MAX_HEADER_BLOCK",
    "RELAY_HEADER",
    "ENCODED_HEADERS",
    "CLIENT_ID_HEADER",
    "IDENTITY_HEADER",
    "VERSION_HEADER",
    "RelayIdentity",
    "fingerprint",
    "MessageKeys",
    "URL",
    "HEADERS",
    "RECORD_SIZE",
    "encoded_length",
    "decoded_length",
    "request_binding",
    "response_binding",
    "ClientPairing",
    "PairReply",
    "relay_pair",
    "ClientPairState",
    "RelayPairState",
    "load_state",
    "EPOCH_SIZE",
    "ENCODE_TYPES",
    "PROTOCOL_VERSION",
    "b64encode",
    "b64decode",
    "check_id",
]
