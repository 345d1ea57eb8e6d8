"""
Small wire-level helpers shared by the codec: strict base64url, identifier syntax and length-prefixed framing.

They live in one place so every field is checked the same way and every failure is a typed ``CodecError``.
"""

import base64
import binascii
import re

from mterelay.codec.errors import BAD_HEADER, BAD_VERSION, DECODE_FAILED, CodecError

PROTOCOL_VERSION = 1
ENCODE_TYPES = ("MKE", "MTE")

#: Client ids (the unsigned id part of an ``x-mte-client-id`` token) and pair ids.
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_B64 = re.compile(rb"[A-Za-z0-9_-]*")


def b64encode(data):
    """base64url without padding, as text."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text, code=DECODE_FAILED, field="base64url"):
    """
    Strict base64url without padding: any other character, a padding sign or non-zero trailing bits raise
    ``CodecError(code)`` so that one value has exactly one encoding.
    """
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if len(raw) % 4 == 1 or not _B64.fullmatch(raw):
        raise CodecError(code, f"{field} is not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise CodecError(code, f"{field} is not unpadded base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=") != raw:
        raise CodecError(code, f"{field} is not canonical base64url")
    return data


def check_id(value, field, code=BAD_HEADER):
    """Return ``value`` if it is a valid client or pair id ([A-Za-z0-9_-]{16,64}), else raise ``CodecError(code)``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise CodecError(code, f"{field} must match [A-Za-z0-9_-]{{16,64}}")
    return value


def check_type(encode_type):
    """Return ``encode_type`` if it is MKE or MTE, else raise ``CodecError(568)``."""
    if encode_type not in ENCODE_TYPES:
        raise CodecError(BAD_VERSION, "encode type must be MKE or MTE")
    return encode_type


def lp(*fields):
    """Concatenate byte fields, each preceded by its 2-byte big-endian length (unambiguous framing)."""
    return b"".join(len(f).to_bytes(2, "big") + f for f in fields)
