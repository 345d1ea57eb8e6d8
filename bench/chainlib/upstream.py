"""
The benchmark's upstream: answers every request with a fixed body, as fast as one Python process can.

It is a raw Twisted protocol with a minimal HTTP/1.1 request framer (Content-Length and chunked bodies, keep-alive,
pipelining) rather than twisted.web, so that it is never the bottleneck of a chain built from twisted.web hops. It also
checks the size of each request body it receives: a chain that mangles the request shows up as 400s in wrk's errors.

``python -m bench.chainlib.upstream --port P [--response-bytes 1024] [--expect-bytes 1024]``
"""

import argparse
import enum

import attrs
from twisted.internet.protocol import Factory, Protocol

from bench.chainlib.serving import serve_forever
from mterelay.errors import error_body

#: Bounds that keep one connection's buffer small whatever a client sends.
MAX_HEAD_BYTES = 16 * 1024
MAX_LINE_BYTES = 1024


class BadRequest(Exception):
    """Raised inside the framer when bytes cannot be framed; the message is a short public reason."""


@attrs.frozen
class RequestSeen:
    """One complete request: what the upstream needs to answer it."""

    method: bytes
    target: bytes
    body_bytes: int
    keep_alive: bool


@attrs.frozen
class Malformed:
    """Bytes that cannot be framed as a request: answered with a 400 that closes the connection."""

    detail: str


class _State(enum.Enum):
    HEAD = enum.auto()
    BODY = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()
    TRAILERS = enum.auto()


class RequestFramer:
    """Incremental request framing: ``feed(bytes)`` returns the requests completed by those bytes, in order."""

    def __init__(self):
        self._buffer = bytearray()
        self._state = _State.HEAD
        self._remaining = 0
        self._request = None

    def feed(self, data):
        """
        The requests completed by ``data``, in order; when the bytes cannot be framed the list ends with a
        ``Malformed`` and the framer accepts nothing more.
        """
        if self._state is None:
            return []
        self._buffer += data
        seen = []
        step = {
            _State.HEAD: self._head,
            _State.BODY: self._body,
            _State.CHUNK_SIZE: self._chunk_size,
            _State.CHUNK_DATA: self._body,
            _State.CHUNK_END: self._chunk_end,
            _State.TRAILERS: self._trailer,
        }
        try:
            # Every step consumes bytes or returns False (needs more), so this loop is bounded by len(data).
            while step[self._state](seen):
                pass
        except BadRequest as failure:
            seen.append(Malformed(str(failure)))
            self._state = None
            self._buffer.clear()
        return seen

    def _take_until(self, separator, limit, what):
        """The bytes before ``separator`` (both consumed), None until it arrives; BadRequest past ``limit``."""
        end = self._buffer.find(separator)
        if end < 0:
            if len(self._buffer) > limit:
                raise BadRequest(f"{what} too long")
            return None
        taken = bytes(self._buffer[:end])
        del self._buffer[: end + len(separator)]
        return taken

    def _line(self, limit):
        return self._take_until(b"\r\n", limit, "line")

    def _head(self, seen):
        head = self._take_until(b"\r\n\r\n", MAX_HEAD_BYTES, "request head")
        if head is None:
            return False
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise BadRequest("bad request line")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = connection != b"close" if parts[2] == b"HTTP/1.1" else connection == b"keep-alive"
        self._request = RequestSeen(parts[0], parts[1], 0, keep_alive)
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            self._state = _State.CHUNK_SIZE
            return True
        try:
            self._remaining = int(headers.get(b"content-length", b"0"))
        except ValueError:
            raise BadRequest("bad content-length") from None
        if self._remaining < 0:
            raise BadRequest("bad content-length")
        self._state = _State.BODY
        return True

    def _body(self, seen):
        taken = min(self._remaining, len(self._buffer))
        del self._buffer[:taken]
        self._remaining -= taken
        self._request = attrs.evolve(self._request, body_bytes=self._request.body_bytes + taken)
        if self._remaining:
            return False
        if self._state is _State.CHUNK_DATA:
            self._state = _State.CHUNK_END
        else:
            self._complete(seen)
        return True

    def _chunk_size(self, seen):
        line = self._line(MAX_LINE_BYTES)
        if line is None:
            return False
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise BadRequest("bad chunk size") from None
        if size < 0:
            raise BadRequest("bad chunk size")
        self._remaining = size
        self._state = _State.CHUNK_DATA if size else _State.TRAILERS
        return True

    def _chunk_end(self, seen):
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise BadRequest("bad chunk end")
        del self._buffer[:2]
        self._state = _State.CHUNK_SIZE
        return True

    def _trailer(self, seen):
        line = self._line(MAX_HEAD_BYTES)
        if line is None:
            return False
        if not line:
            self._complete(seen)
        return True

    def _complete(self, seen):
        seen.append(self._request)
        self._request = None
        self._state = _State.HEAD


def response_body(size):
    """The upstream's answer body: binary (every byte value), so a chain that mangles bytes is caught."""
    return bytes(i % 251 for i in range(size))


def _response(status, reason, body, content_type, close):
    head = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


@attrs.frozen
class Answers:
    """The prepared responses of one upstream: built once, written as is."""

    expect_bytes: int | None
    ok: bytes
    ok_close: bytes

    @classmethod
    def build(cls, response_bytes, expect_bytes):
        body = response_body(response_bytes)
        return cls(
            expect_bytes,
            _response(200, "OK", body, "application/octet-stream", close=False),
            _response(200, "OK", body, "application/octet-stream", close=True),
        )

    def answer(self, request):
        """The bytes answering ``request``: the body, or a 400 when the request body has the wrong size."""
        if self.expect_bytes is not None and request.body_bytes != self.expect_bytes:
            detail = f"request body was {request.body_bytes} bytes, expected {self.expect_bytes}"
            return _response(400, "Bad Request", error_body(400, detail), "application/json", not request.keep_alive)
        return self.ok if request.keep_alive else self.ok_close


def bad_request(detail):
    """A closing 400 answer for bytes that cannot be framed."""
    return _response(400, "Bad Request", error_body(400, detail), "application/json", close=True)


class UpstreamProtocol(Protocol):
    """Frames requests and answers each at once, in order (so pipelining works)."""

    def __init__(self, answers):
        self._answers = answers
        self._framer = RequestFramer()

    def dataReceived(self, data):
        for request in self._framer.feed(data):
            if isinstance(request, Malformed):
                self.transport.write(bad_request(request.detail))
                self.transport.loseConnection()
                return
            self.transport.write(self._answers.answer(request))
            if not request.keep_alive:
                self.transport.loseConnection()
                return


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--response-bytes", type=int, default=1024)
    parser.add_argument("--expect-bytes", type=int, default=None, help="answer 400 to any other request body size")
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_args(argv)
    answers = Answers.build(options.response_bytes, options.expect_bytes)
    serve_forever(options.port, lambda reactor: Factory.forProtocol(lambda: UpstreamProtocol(answers)))


if __name__ == "__main__":
    main()
