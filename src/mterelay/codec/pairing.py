"""
Pairing: the client sends a fresh X-Wing public key, the relay encapsulates to it and signs the transcript with its
Ed25519 identity, and both sides derive the pair's two direction keys with HKDF-SHA256 bound to the whole transcript.
"""

import hashlib

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mterelay.codec import xwing
from mterelay.codec.errors import PAIRING_FAILED, CodecError
from mterelay.codec.identity import check_pin, verify_signature
from mterelay.codec.state import ClientPairState, RelayPairState
from mterelay.codec.wire import PROTOCOL_VERSION, check_id, check_type, lp

SIGNATURE_SIZE = 64
IDENTITY_SIZE = 32


def transcript_hash(encode_type, client_id, pair_id, public_key, ciphertext, identity_public):
    """SHA-256 of the length-prefixed transcript: everything both sides must agree on."""
    transcript = b"mterelay/1 pairing" + lp(
        bytes((PROTOCOL_VERSION,)),
        encode_type.encode("ascii"),
        client_id.encode("ascii"),
        pair_id.encode("ascii"),
        public_key,
        ciphertext,
        identity_public,
    )
    return hashlib.sha256(transcript).digest()


def signed_message(digest):
    """What the relay signs: a context label then the transcript hash."""
    return b"mterelay/1 relay signature" + digest


def _direction_keys(shared_secret, digest):
    keys = HKDF(hashes.SHA256(), 64, salt=digest, info=b"mterelay/1 pair keys").derive(shared_secret)
    return keys[:32], keys[32:]


@attrs.frozen
class PairReply:
    """What the relay returns for one pair: the X-Wing ciphertext and its signature of the transcript."""

    ciphertext: bytes = attrs.field(repr=False)
    signature: bytes = attrs.field(repr=False)


def _check_pair(client_id, pair_id, encode_type):
    check_id(client_id, "client id", PAIRING_FAILED)
    check_id(pair_id, "pairId", PAIRING_FAILED)
    check_type(encode_type)


def relay_pair(identity, client_id, pair_id, encode_type, public_key):
    """The relay's side of one pairing: ``(RelayPairState, PairReply)``, or ``CodecError`` 565 / 568."""
    _check_pair(client_id, pair_id, encode_type)
    try:
        shared, ciphertext = xwing.encapsulate(bytes(public_key))
    except ValueError:
        raise CodecError(PAIRING_FAILED, "publicKey is not an X-Wing public key") from None
    digest = transcript_hash(encode_type, client_id, pair_id, public_key, ciphertext, identity.public_bytes())
    c2s, s2c = _direction_keys(shared, digest)
    state = RelayPairState(client_id, pair_id, encode_type, 0, c2s, s2c)
    return state, PairReply(ciphertext, identity.sign(signed_message(digest)))


class ClientPairing:
    """The client's side of one pairing, between ``start`` and ``finish``; holds the X-Wing private key."""

    __slots__ = ("client_id", "pair_id", "encode_type", "_key")

    def __init__(self, client_id, pair_id, encode_type, key):
        _check_pair(client_id, pair_id, encode_type)
        self.client_id = client_id
        self.pair_id = pair_id
        self.encode_type = encode_type
        self._key = key

    @classmethod
    def start(cls, client_id, pair_id, encode_type):
        """Begin pairing with a fresh X-Wing key."""
        return cls(client_id, pair_id, encode_type, xwing.XWingPrivateKey.generate())

    @property
    def public_key(self):
        """The 1216-byte X-Wing public key to send as ``publicKey``."""
        return self._key.public_key

    def __repr__(self):
        return f"<ClientPairing {self.encode_type} pair={self.pair_id}>"

    def finish(self, ciphertext, signature, identity_public, pin=None):
        """
        Check the relay's signature (and ``pin``: the raw identity key or its SHA-256 fingerprint) and derive the
        pair state; any mismatch raises ``CodecError(565)``.
        """
        if len(identity_public) != IDENTITY_SIZE or len(signature) != SIGNATURE_SIZE:
            raise CodecError(PAIRING_FAILED, "relay identity or signature has the wrong length")
        if len(ciphertext) != xwing.CIPHERTEXT_SIZE:
            raise CodecError(PAIRING_FAILED, "ciphertext has the wrong length")
        check_pin(identity_public, pin)
        digest = transcript_hash(
            self.encode_type, self.client_id, self.pair_id, self.public_key, ciphertext, identity_public
        )
        verify_signature(identity_public, signature, signed_message(digest))
        try:
            shared = self._key.decapsulate(ciphertext)
        except ValueError:
            raise CodecError(PAIRING_FAILED, "ciphertext does not decapsulate") from None
        c2s, s2c = _direction_keys(shared, digest)
        return ClientPairState(self.client_id, self.pair_id, self.encode_type, 0, c2s, s2c)
