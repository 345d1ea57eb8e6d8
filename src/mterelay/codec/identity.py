"""The relay's long-term Ed25519 identity, which signs pairing transcripts so that clients can pin it."""

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mterelay.codec.errors import PAIRING_FAILED, CodecError
from mterelay.codec.wire import b64encode


def fingerprint(public_bytes):
    """SHA-256 of a raw 32-byte identity public key: the value a client may pin."""
    return hashlib.sha256(public_bytes).digest()


def verify_signature(public_bytes, signature, message):
    """Raise ``CodecError(565)`` unless ``signature`` is ``public_bytes``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise CodecError(PAIRING_FAILED, "relay signature does not verify") from None


def check_pin(public_bytes, pin):
    """Raise ``CodecError(565)`` unless ``pin`` is the raw identity key or its fingerprint (``None`` pins nothing)."""
    if pin is None:
        return
    if not (hmac.compare_digest(pin, public_bytes) or hmac.compare_digest(pin, fingerprint(public_bytes))):
        raise CodecError(PAIRING_FAILED, "relay identity does not match the pin")


class RelayIdentity:
    """An Ed25519 signing key; its repr shows only the public fingerprint."""

    __slots__ = ("_key", "_public")

    def __init__(self, private_key):
        self._key = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls):
        """A fresh identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed):
        """The identity whose raw 32-byte Ed25519 private key is ``seed`` (test vectors)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data):
        """Load an unencrypted PKCS#8 PEM Ed25519 key; anything else raises ``ValueError``."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            # cryptography's answer to a key encrypted with a password: twistd has no way to ask for one.
            raise ValueError("the key is encrypted; store it unencrypted with file mode 0600") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the relay identity must be an Ed25519 key")
        return cls(key)

    def to_pem(self):
        """The private key as unencrypted PKCS#8 PEM (store it with file mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_bytes(self):
        """The raw 32-byte public key."""
        return self._public

    def public_b64(self):
        """The public key as unpadded base64url (the ``x-mte-relay-identity`` header value)."""
        return b64encode(self._public)

    def fingerprint(self):
        """SHA-256 of the public key."""
        return fingerprint(self._public)

    def sign(self, message):
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)

    def __repr__(self):
        return f"<RelayIdentity sha256:{self.fingerprint()[:8].hex()}>"
