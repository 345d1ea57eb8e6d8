"""
Signed client ids (``x-mte-client-id``).

A client id is a random public name for one client, signed by the relay so that a relay (or any relay instance behind
the same load balancer) can tell its own ids from forged ones without storing them. The token is
``<id>.<mac>`` where ``id`` is 22 base64url characters (16 random bytes) and ``mac`` is the base64url HMAC-SHA256 of the
id under a CLIENT_ID_SECRET. Several secrets may be configured for rotation: the first signs, all verify, and a token
signed by an older secret is re-signed with the first so clients move to the new secret as they go.
"""

import base64
import hmac
import re
import secrets

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from mterelay.errors import RelayError

_ID_BYTES = 16
#: Client ids remembered as verified (about 200 bytes each).
VERIFIED_CACHE_SIZE = 10_000
_TOKEN = re.compile(r"^([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})$")


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class BadClientId(RelayError):
    """The client id token is missing, malformed or not signed by any configured secret (566)."""

    def __init__(self, detail="x-mte-client-id is missing or not signed by this relay"):
        super().__init__(566, detail)


@attrs.frozen
class VerifiedClientId:
    """A client id whose signature checked out."""

    client_id: str
    #: The token the client should use from now on (re-signed with the newest secret when needed).
    token: str
    resigned: bool


@attrs.frozen
class ClientIdSigner:
    """Issues and verifies signed client ids with one or more secrets (first signs, all verify)."""

    _keys: tuple = attrs.field(
        repr=False, converter=lambda ks: tuple(k.encode("utf-8") if isinstance(k, str) else k for k in ks)
    )

    @_keys.validator
    def _check(self, attribute, value):
        if not value:
            raise ValueError("at least one CLIENT_ID_SECRET is needed")

    #: Client ids seen verified, with the MAC that verified them: a repeat is checked by one constant-time comparison
    #: instead of an HMAC per secret. Bounded; the oldest entries go first.
    _verified: dict = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def _mac(self, key, client_id):
        mac = HMAC(key, hashes.SHA256())
        mac.update(client_id.encode("ascii"))
        return _b64(mac.finalize())

    def sign(self, client_id):
        """The token for ``client_id`` under the newest secret."""
        return f"{client_id}.{self._mac(self._keys[0], client_id)}"

    def issue(self):
        """A fresh client id, signed."""
        return self.verify(self.sign(_b64(secrets.token_bytes(_ID_BYTES))))

    def verify(self, token):
        """
        Check ``token`` against every secret, in constant time per secret; raise :class:`BadClientId` when none signs it.
        """
        match = _TOKEN.match(token or "")
        if match is None:
            raise BadClientId()
        client_id, mac = match.groups()
        known = self._verified.get(client_id)
        if known is not None and hmac.compare_digest(known[0], mac):
            return known[1]
        # Check every secret, so the time taken does not tell which one matched.
        matches = [hmac.compare_digest(self._mac(key, client_id), mac) for key in self._keys]
        if not any(matches):
            raise BadClientId()
        resigned = not matches[0]
        verified = VerifiedClientId(client_id, self.sign(client_id) if resigned else token, resigned)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[client_id] = (mac, verified)
        return verified
