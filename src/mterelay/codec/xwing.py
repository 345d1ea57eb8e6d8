"""
The X-Wing hybrid KEM (draft-connolly-cfrg-xwing-kem-08): ML-KEM-768 and X25519 combined with SHA3-256.

Composed from ``cryptography`` primitives only; ``hpke.MLKEM768X25519PrivateKey`` exposes no raw encapsulation, so the
combiner is spelled out here. Checked against the draft's published vector (tests/vectors/xwing-draft-08.json).
"""

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

PUBLIC_KEY_SIZE = 1216
CIPHERTEXT_SIZE = 1120
_MLKEM_PK = 1184
_MLKEM_CT = 1088
#: The draft's domain separator ``\.//^\``.
_LABEL = b"\\.//^\\"


def _combine(ss_m, ss_x, ct_x, pk_x):
    digest = hashes.Hash(hashes.SHA3_256())
    digest.update(ss_m + ss_x + ct_x + pk_x + _LABEL)
    return digest.finalize()


class XWingPrivateKey:
    """An X-Wing decapsulation key, expanded from a 32-byte seed as the draft specifies."""

    __slots__ = ("_mlkem", "_x25519", "public_key")

    def __init__(self, seed):
        shake = hashes.Hash(hashes.SHAKE256(96))
        shake.update(seed)
        expanded = shake.finalize()
        self._mlkem = MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
        self._x25519 = X25519PrivateKey.from_private_bytes(expanded[64:])
        #: The 1216-byte encapsulation key: ML-KEM-768 public key then X25519 public key.
        self.public_key = self._mlkem.public_key().public_bytes_raw() + self._x25519.public_key().public_bytes_raw()

    @classmethod
    def generate(cls):
        """A fresh key from the OS random source."""
        return cls(os.urandom(32))

    def __repr__(self):
        return "<XWingPrivateKey>"

    def decapsulate(self, ciphertext):
        """The 32-byte shared secret for ``ciphertext``; raises ``ValueError`` on a malformed ciphertext."""
        if len(ciphertext) != CIPHERTEXT_SIZE:
            raise ValueError("X-Wing ciphertext has the wrong length")
        ct_x = ciphertext[_MLKEM_CT:]
        ss_m = self._mlkem.decapsulate(ciphertext[:_MLKEM_CT])
        ss_x = self._x25519.exchange(X25519PublicKey.from_public_bytes(ct_x))
        return _combine(ss_m, ss_x, ct_x, self.public_key[_MLKEM_PK:])


def encapsulate(public_key):
    """``(shared_secret, ciphertext)`` for a 1216-byte X-Wing public key; raises ``ValueError`` if it is malformed."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError("X-Wing public key has the wrong length")
    pk_x = public_key[_MLKEM_PK:]
    ss_m, ct_m = MLKEM768PublicKey.from_public_bytes(public_key[:_MLKEM_PK]).encapsulate()
    ephemeral = X25519PrivateKey.generate()
    ct_x = ephemeral.public_key().public_bytes_raw()
    ss_x = ephemeral.exchange(X25519PublicKey.from_public_bytes(pk_x))
    return _combine(ss_m, ss_x, ct_x, pk_x), ct_m + ct_x
