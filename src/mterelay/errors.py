"""
The relay's error codes: one table, used by every module that answers a request with an error.

Codes 559-569 are relay-specific statuses that tell a client what to do (re-pair, retry, fix the request). 400, 401,
403, 404, 408, 413, 431, 501, 502, 503 and 504 keep their HTTP meaning. Every error answer is a short JSON body
``{"error": <name>, "code": <code>, "message": <text>}`` that never carries a secret or a traceback.
"""

import json

import attrs


@attrs.frozen
class ErrorCode:
    """One entry of the relay's error table."""

    code: int
    name: str
    message: str
    #: True when a client should drop the pair (or client id) and pair again before retrying.
    repair: bool = False


_TABLE = (
    ErrorCode(400, "bad-request", "The request is malformed; the message names the field or header."),
    ErrorCode(401, "unauthorized", "The x-mte-outbound-token header is missing or wrong."),
    ErrorCode(403, "forbidden", "The x-mte-upstream relay is not one of ALLOWED_PEERS."),
    ErrorCode(404, "not-found", "No pass-through or MTE route matches this path."),
    ErrorCode(408, "request-timeout", "The request did not arrive in time."),
    ErrorCode(413, "body-too-large", "The body is larger than MAX_BODY_SIZE."),
    ErrorCode(431, "headers-too-large", "The request's headers are too many or too long to encode."),
    ErrorCode(501, "not-implemented", "This route is not served by this relay."),
    ErrorCode(502, "bad-gateway", "The upstream (or peer relay) could not be reached or broke off its answer."),
    ErrorCode(503, "unavailable", "The session registry (Redis) is unreachable; retry later."),
    ErrorCode(504, "gateway-timeout", "The upstream did not answer within UPSTREAM_TIMEOUT."),
    ErrorCode(559, "repair-required", "The pair can no longer be used; pair again.", repair=True),
    ErrorCode(560, "unknown-pair", "The relay holds no state for this client id and pair id; pair again.", repair=True),
    ErrorCode(561, "encode-failed", "The relay could not encode the response."),
    ErrorCode(562, "decode-failed", "A message failed authentication or framing and was not decoded."),
    ErrorCode(563, "replay", "The message counter was already used or lies outside the receive window."),
    ErrorCode(564, "exhausted", "The pair's epochs or ratchet are used up; pair again.", repair=True),
    ErrorCode(565, "pairing-failed", "The pair request could not be completed."),
    ErrorCode(
        566,
        "bad-client-id",
        "The x-mte-client-id is missing, forged or signed with a retired secret; fetch a new one.",
        repair=True,
    ),
    ErrorCode(567, "pair-limit", "Too many pairs for this client or for the relay; reuse or let old pairs expire."),
    ErrorCode(568, "unsupported-version", "The protocol version or encode type is not supported."),
    ErrorCode(569, "missing-header", "A required x-mte-* header is missing or malformed."),
)

CODES = {entry.code: entry for entry in _TABLE}


class RelayError(Exception):
    """
    A failure that the relay answers with one of its error codes.

    ``detail`` is a short public explanation (a field or header name); it must never hold a secret or decoded data.
    """

    def __init__(self, code, detail=None):
        if code not in CODES:
            raise ValueError(f"unknown relay error code {code}")
        self.code = code
        self.detail = detail or CODES[code].message
        super().__init__(code, self.detail)

    @property
    def entry(self):
        return CODES[self.code]

    def body(self):
        """The JSON body that answers this error."""
        return error_body(self.code, self.detail)


def error_body(code, detail=None):
    """A short JSON error body for ``code``: name, code and a public message."""
    entry = CODES[code]
    return json.dumps(
        {"error": entry.name, "code": entry.code, "message": detail or entry.message}, separators=(",", ":")
    ).encode("utf-8")


def error_table():
    """The whole table as JSON-ready dicts, in code order, for ``GET /api/mte-errors``."""
    return [attrs.asdict(entry) for entry in _TABLE]
