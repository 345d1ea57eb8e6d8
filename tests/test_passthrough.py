"""Pass-through routes over real sockets: a client, the relay in this process, and a real upstream."""

import hashlib
import json
import os
import socket

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, readBody
from twisted.web.http_headers import Headers

from mterelay.config import Settings
from mterelay.upstream import RequestBodyProducer
from tests.relay_harness import RelayHarness, raw_exchange, rss_kib
from tests.upstream_server import UpstreamServer, pattern_sha256, serve_relay

SECRET = "s" * 40


class PassThroughTestCase(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.upstream = UpstreamServer(reactor)
        yield self.upstream.start()
        self.addCleanup(self.upstream.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def relay(self, **changes):
        """Start a relay in front of the test upstream with pass-through routes for every test path."""
        values = dict(
            upstream=self.upstream.url,
            client_id_secrets=[SECRET],
            pass_through_routes=(
                "/echo*", "/status/*", "/cookies/*", "/redirect", "/bytes/*", "/slow/*", "/stall/*", "/untyped"
            ),
            headers=(("x-service-name", "mte-relay"),),
        )
        values.update(changes)
        relay = yield serve_relay(reactor, Settings(**values))
        self.addCleanup(relay.stop)
        return relay

    def request(self, relay, method, path, **kwargs):
        return self.client.request(method, relay.url + path, allow_redirects=False, unbuffered=True, **kwargs)


class RoundTripTests(PassThroughTestCase):
    @inlineCallbacks
    def test_binary_body_query_and_headers(self):
        """A binary body, the raw query string, method and end-to-end headers reach the upstream unchanged."""
        relay = yield self.relay()
        body = bytes(range(256)) * 1000 + os.urandom(4096)
        headers = Headers(
            {
                b"content-type": [b"application/octet-stream"],
                b"x-custom": [b"kept"],
                b"x-mte-secret": [b"never forwarded"],
                b"connection": [b"x-listed"],
                b"x-listed": [b"hop-by-hop"],
            }
        )
        response = yield self.request(relay, "PUT", "/echo/a%20b?x=1&y=%00%ff&x=2", data=body, headers=headers)
        self.assertEqual(response.code, 200)
        summary = json.loads((yield readBody(response)))
        self.assertEqual(summary["method"], "PUT")
        self.assertEqual(summary["path"], "/echo/a%20b")
        self.assertEqual(summary["query"], "x=1&y=%00%ff&x=2")
        self.assertEqual(summary["body_sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(summary["body_length"], len(body))
        sent = summary["headers"]
        self.assertEqual(sent["x-custom"], ["kept"])
        self.assertEqual(sent["host"], [self.upstream.url.split("//")[1]])
        self.assertEqual(sent["x-service-name"], ["mte-relay"])
        self.assertEqual(sent["x-forwarded-for"], ["127.0.0.1"])
        for dropped in ("x-mte-secret", "x-listed"):
            self.assertNotIn(dropped, sent)
        self.assertEqual(response.headers.getRawHeaders(b"x-upstream"), [b"test"])
        self.assertEqual(response.headers.getRawHeaders(b"x-service-name"), [b"mte-relay"])

    @inlineCallbacks
    def test_status_codes(self):
        """The upstream's status is kept, bodiless 204 and 304 included."""
        relay = yield self.relay()
        for code in (201, 418, 500, 204, 304):
            response = yield self.request(relay, "GET", f"/status/{code}")
            body = yield readBody(response)
            self.assertEqual(response.code, code)
            if code in (204, 304):
                self.assertEqual(body, b"")

    @inlineCallbacks
    def test_invalid_status_is_bad_gateway(self):
        """An upstream status outside 100-599 (invalid, RFC 9110 15) is answered as the relay's JSON 502, not passed
        on to a client that may not parse it."""
        relay = yield self.relay()
        for code in (600, 799, 999):
            response = yield self.request(relay, "GET", f"/status/{code}")
            body = json.loads((yield readBody(response)))
            self.assertEqual((response.code, body["code"]), (502, 502))

    @inlineCallbacks
    def test_untyped_body_stays_untyped(self):
        """An upstream answer without Content-Type gets none from the relay (twisted.web's default is text/html,
        which a browser would render as a page)."""
        relay = yield self.relay()
        response = yield self.request(relay, "GET", "/untyped")
        self.assertEqual((yield readBody(response)), b"<b>not a page</b>")
        self.assertFalse(response.headers.hasHeader(b"content-type"))

    @inlineCallbacks
    def test_several_set_cookies(self):
        """Every Set-Cookie header of the upstream's answer reaches the client, intact and in order."""
        relay = yield self.relay()
        response = yield self.request(relay, "GET", "/cookies/3")
        yield readBody(response)
        self.assertEqual(
            response.headers.getRawHeaders(b"set-cookie"), [b"c0=v0; Path=/", b"c1=v1; Path=/", b"c2=v2; Path=/"]
        )

    @inlineCallbacks
    def test_origin_server_and_date_kept(self):
        """The upstream's Server and Date reach the client, not the relay's own defaults (Twisted's name and version,
        the time it relayed): a proxy passes the origin's on."""
        relay = yield self.relay()
        response = yield self.request(relay, "GET", "/echo/x")
        yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"server"), [b"mterelay-test-upstream"])
        self.assertEqual(response.headers.getRawHeaders(b"date"), [b"Tue, 01 Jan 2030 00:00:00 GMT"])
        # The relay's own answers name no server; a Server in HEADERS is the operator's, and wins.
        response = yield self.request(relay, "GET", "/api/mte-echo/x")
        yield readBody(response)
        self.assertFalse(response.headers.hasHeader(b"server"))
        relay = yield self.relay(headers=(("Server", "edge-proxy"),))
        response = yield self.request(relay, "GET", "/echo/x")
        yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"server"), [b"edge-proxy"])

    @inlineCallbacks
    def test_redirect_returned_not_followed(self):
        """A redirect is handed to the client, not followed by the relay."""
        relay = yield self.relay()
        response = yield self.request(relay, "GET", "/redirect?to=http://127.0.0.1:1/elsewhere")
        yield readBody(response)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"http://127.0.0.1:1/elsewhere"])
        self.assertEqual(len(self.upstream.received), 1)

    @inlineCallbacks
    def test_streamed_download(self):
        """A large answer, with and without Content-Length, arrives whole."""
        relay = yield self.relay()
        for suffix in ("", "?chunked=1"):
            response = yield self.request(relay, "GET", f"/bytes/3000000{suffix}")
            body = yield readBody(response)
            self.assertEqual(hashlib.sha256(body).hexdigest(), pattern_sha256(3000000))

    @inlineCallbacks
    def test_head_keeps_length(self):
        """HEAD answers carry the upstream's Content-Length and no body."""
        relay = yield self.relay()
        response = yield self.request(relay, "HEAD", "/bytes/1234")
        self.assertEqual((yield readBody(response)), b"")
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])


class FailureTests(PassThroughTestCase):
    @inlineCallbacks
    def assertError(self, response, code):
        body = json.loads((yield readBody(response)))
        self.assertEqual((response.code, body["code"]), (code, code))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    @inlineCallbacks
    def test_endless_answer_head_refused(self):
        """An upstream whose answer's head goes on and on (400 KB of header lines) is dropped once the head passes
        MAX_ANSWER_HEAD, and the client gets a JSON 502 instead of the relay reading it all into memory."""

        class EndlessHead(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 200 OK\r\n" + b"x-h: a\r\n" * 50000 + b"\r\nbody")

        port = reactor.listenTCP(0, Factory.forProtocol(EndlessHead), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relay = yield self.relay(upstream=f"http://127.0.0.1:{port.getHost().port}", pass_through_routes=("/x",))
        response = yield self.request(relay, "GET", "/x")
        yield self.assertError(response, 502)

    @inlineCallbacks
    def test_unreachable_upstream(self):
        """An upstream that refuses connections answers 502 with a JSON body."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        relay = yield self.relay(upstream=f"http://127.0.0.1:{closed}")
        response = yield self.request(relay, "GET", "/echo")
        yield self.assertError(response, 502)

    @inlineCallbacks
    def test_slow_upstream(self):
        """An upstream slower than UPSTREAM_TIMEOUT answers 504, and the upstream request is abandoned."""
        relay = yield self.relay(upstream_timeout=0.3)
        response = yield self.request(relay, "GET", "/slow/30")
        yield self.assertError(response, 504)
        yield self._until(lambda: self.upstream.abandoned == 1)

    @inlineCallbacks
    def test_stalled_upstream_body(self):
        """An upstream that stops sending its body for UPSTREAM_TIMEOUT is broken off: the client's connection is
        aborted (never a silently short body) and the upstream connection closed."""
        relay = yield self.relay(upstream_timeout=0.3)
        response = yield self.request(relay, "GET", "/stall/1000")
        self.assertEqual(response.code, 200)
        with self.assertRaises(Exception):
            yield readBody(response)
        yield self._until(lambda: self.upstream.abandoned == 1)

    @inlineCallbacks
    def test_steady_upload_longer_than_the_timeout(self):
        """
        UPSTREAM_TIMEOUT counts from the request body's last progress, not from the request's start: an upload to an
        upstream that reads in bursts (each pause shorter than the timeout, all of them longer) is answered 200;
        an upstream that stops reading for longer than the timeout is 504.
        """
        pauses, readers = [], []
        build = lambda: readers.append(_BurstReader(pauses)) or readers[-1]  # noqa: E731
        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # A reader left paused by the relay's abort only learns of it once it reads again.
        self.addCleanup(lambda: [reader.transport.abortConnection() for reader in readers])
        # Small receive buffers: a paused reader soon stops its sender.
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        relay = yield self.relay(upstream=f"http://127.0.0.1:{port.getHost().port}", upstream_timeout=1.0)
        body = os.urandom(16 << 20)
        pauses.extend([0.25] * 6)
        response = yield self.request(relay, "POST", "/echo/upload", data=body)
        self.assertEqual((response.code, (yield readBody(response))), (200, b"%d" % len(body)))
        self.assertEqual(pauses, [])
        pauses.append(2.0)
        response = yield self.request(relay, "POST", "/echo/upload", data=body)
        yield self.assertError(response, 504)

    @inlineCallbacks
    def test_half_closed_client_answered(self):
        """A client that half-closes once its request is sent (it has nothing more to say) still gets the whole
        answer, then the connection closes; one that half-closes mid-head gets no answer and nothing goes upstream."""
        relay = yield self.relay()
        port = int(relay.url.rsplit(":", 1)[1])
        answer = yield ensureDeferred(raw_exchange(port, b"GET /slow/0.2 HTTP/1.1\r\nHost: a\r\n\r\n", half_close=True))
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b'"path": "/slow/0.2"', body)
        self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"), body)  # the chunked body's end: the whole answer
        answer = yield ensureDeferred(raw_exchange(port, b"GET /echo/cut HTTP/1.1\r\nHost: a\r\n", half_close=True))
        self.assertEqual(answer, b"")
        self.assertEqual([r.path for r in self.upstream.received], ["/slow/0.2"])

    @inlineCallbacks
    def test_client_disconnect_cancels_upstream(self):
        """A client that goes away while the upstream is working makes the relay abandon the upstream request."""
        relay = yield self.relay()
        pending = self.request(relay, "GET", "/slow/30")
        yield self._until(lambda: len(self.upstream.received) == 1)
        pending.cancel()
        yield self._until(lambda: self.upstream.abandoned == 1)
        yield self._until(lambda: len(relay.tracker) == 0)
        self.failureResultOf(pending)

    @inlineCallbacks
    def test_body_too_large(self):
        """A body over MAX_BODY_SIZE is refused with 413 as soon as its Content-Length or its chunks show it."""
        relay = yield self.relay(max_body_size=1000)
        port = int(relay.url.rsplit(":", 1)[1])
        for head in (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3e8\r\n"
            + b"a" * 1000
            + b"\r\n1\r\nb\r\n",
        ):
            answer = yield ensureDeferred(raw_exchange(port, head))
            status, _, rest = answer.partition(b"\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 413 "), status)
            self.assertEqual(json.loads(rest.split(b"\r\n\r\n", 1)[1])["code"], 413)
            self.assertNotIn(b"100 Continue", answer)
        self.assertEqual(self.upstream.received, [])

    @inlineCallbacks
    def test_not_listed_path_is_404_with_mte_routes(self):
        """With MTE_ROUTES set, a path that is neither pass-through nor MTE answers 404."""
        relay = yield self.relay(mte_routes=("/api/*",))
        response = yield self.request(relay, "GET", "/nowhere")
        yield self.assertError(response, 404)

    @inlineCallbacks
    def _until(self, condition, seconds=5.0):
        for _ in range(int(seconds / 0.02)):
            if condition():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("condition not reached in time")


class MisbehavingUpstreamTests(PassThroughTestCase):
    """Answers that Twisted's client takes in ways a relay must not pass on as they are, from a raw-socket upstream."""

    @inlineCallbacks
    def raw_relay(self, answers, **changes):
        """A relay in front of a ``_RawAnswers`` upstream with ``answers``, every path passed through."""
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _RawAnswers(answers)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        upstream = f"http://127.0.0.1:{port.getHost().port}"
        relay = yield self.relay(upstream=upstream, pass_through_routes=("/*",), **changes)
        return relay

    @inlineCallbacks
    def test_close_delimited_body_ends_only_at_a_clean_close(self):
        """
        An answer without Content-Length ends where its connection does, but only where it is closed cleanly: one
        reset (TCP RST) partway, even right after its head (which went out at once), reaches the client broken off
        (its connection aborted, never a whole chunked body).
        """
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        body = b"A" * 5000
        relay = yield self.raw_relay({b"/clean": head + body, b"/reset": head + body, b"/reset-head": head})
        response = yield self.request(relay, "GET", "/clean")
        self.assertEqual((yield readBody(response)), body)
        response = yield self.request(relay, "GET", "/reset")
        self.assertEqual(response.code, 200)
        with self.assertRaises(ResponseFailed):
            yield readBody(response)
        response = yield self.request(relay, "GET", "/reset-head")
        self.assertEqual(response.code, 200)
        with self.assertRaises(ResponseFailed):
            yield readBody(response)

    @inlineCallbacks
    def test_headers_listed_in_connection_dropped(self):
        """Headers that the upstream's Connection header names are this hop's (RFC 9110 7.6.1): none reaches the
        client (Twisted's client keeps Connection out of the answer's headers, so nothing else would see them)."""
        relay = yield self.raw_relay(
            {
                b"/x": b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop-Secret\r\nConnection: x-other\r\n"
                b"X-Hop-Secret: internal\r\nX-Other: o\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"
            }
        )
        response = yield self.request(relay, "GET", "/x")
        self.assertEqual((yield readBody(response)), b"ok")
        self.assertEqual(response.headers.getRawHeaders(b"x-kept"), [b"k"])
        for name in (b"x-hop-secret", b"x-other", b"connection"):
            self.assertFalse(response.headers.hasHeader(name), name)

    @inlineCallbacks
    def test_empty_and_odd_connection_list_elements(self):
        """Empty elements in the upstream's Connection list (RFC 9110 5.6.1: a recipient accepts them) and elements
        that are no header name are skipped: the answer passes (it was a 502, and its connection was left unread)."""
        answers = {
            b"/%d" % i: b"HTTP/1.1 200 OK\r\nConnection: %s\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok" % value
            for i, value in enumerate((b"keep-alive,", b"close, ", b",close", b"", b"close, x y"))
        }
        relay = yield self.raw_relay(answers)
        for path in answers:
            response = yield self.request(relay, "GET", path.decode())
            self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"), path)
            self.assertEqual(response.headers.getRawHeaders(b"x-kept"), [b"k"], path)

    @inlineCallbacks
    def test_bodiless_answers_keep_the_upstreams_length_or_none(self):
        """
        A 304 carries the upstream's Content-Length (the length the 200 would have had, RFC 9110 8.6) or none, like
        a HEAD answer; a 204 none: never a made-up 0.
        """
        relay = yield self.raw_relay(
            {
                b"/304-length": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 1234\r\n\r\n',
                b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
                b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
                b"/head": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
            }
        )
        port = int(relay.url.rsplit(":", 1)[1])
        for method, path, status, lengths in (
            (b"GET", b"/304-length", b"304", [b"1234"]),
            (b"GET", b"/304", b"304", []),
            (b"GET", b"/204", b"204", []),
            (b"HEAD", b"/head", b"200", []),
        ):
            # Read raw: Twisted's client would hide a 304's Content-Length too.
            answer = yield ensureDeferred(
                raw_exchange(port, b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (method, path))
            )
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            self.assertEqual(lines[0].split(b" ")[1], status)
            self.assertEqual([line[16:] for line in lines if line.startswith(b"content-length: ")], lengths, path)
            self.assertEqual(body, b"")

    @inlineCallbacks
    def test_upstream_vary_merged_with_the_relays(self):
        """Where the relay grants CORS (and so varies on Origin), the client still gets every name the upstream's
        Vary lists, Origin added once; an upstream's ``Vary: *`` stays ``*``."""
        relay = yield self.raw_relay(
            {
                b"/vary": b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding, origin\r\nVary: Authorization\r\n"
                b"Content-Length: 2\r\n\r\nok",
                b"/any": b"HTTP/1.1 200 OK\r\nVary: *\r\nContent-Length: 2\r\n\r\nok",
            },
            cors_origins=("https://app.example",),
        )
        for path, vary in (("/vary", [b"Accept-Encoding, origin, Authorization"]), ("/any", [b"*"])):
            response = yield self.request(relay, "GET", path, headers={"Origin": "https://app.example"})
            self.assertEqual((yield readBody(response)), b"ok")
            self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"https://app.example"])
            self.assertEqual(response.headers.getRawHeaders(b"vary"), vary)


class _RawAnswers(Protocol):
    """
    A misbehaving upstream: once a request's head arrived, writes the bytes ``answers`` has for its path as they
    are, then closes the connection 0.1 s later, with a TCP reset when the path starts with ``/reset``.
    """

    def __init__(self, answers):
        self._answers = answers
        self._head = b""
        self._close = None

    def dataReceived(self, data):
        self._head += data
        if self._close is None and b"\r\n\r\n" in self._head:
            path = self._head.split(b" ", 2)[1]
            self.transport.write(self._answers[path])
            close = self.transport.abortConnection if path.startswith(b"/reset") else self.transport.loseConnection
            self._close = reactor.callLater(0.1, close)

    def connectionLost(self, reason):
        if self._close is not None and self._close.active():
            self._close.cancel()


class _BurstReader(Protocol):
    """
    An upstream that reads a request in bursts: after every MiB it stops reading for the next of ``pauses`` (popped
    as used), then answers 200 with the body's length once the whole body (by Content-Length) arrived.
    """

    def __init__(self, pauses):
        self._pauses = pauses
        self._head = b""
        self._length = None
        self._body = 0
        self._since_pause = 0
        self._resume = None

    def dataReceived(self, data):
        if self._length is None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            self._head, _, data = self._head.partition(b"\r\n\r\n")
            self._length = int(self._head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
        self._body += len(data)
        self._since_pause += len(data)
        if self._body >= self._length:
            answer = b"%d" % self._body
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            self.transport.loseConnection()
        elif self._since_pause >= 1 << 20 and self._pauses:
            self._since_pause = 0
            self.transport.pauseProducing()
            self._resume = reactor.callLater(self._pauses.pop(0), self.transport.resumeProducing)

    def connectionLost(self, reason):
        if self._resume is not None and self._resume.active():
            self._resume.cancel()


class _PatternFile:
    """A file-like source of ``length`` pattern bytes that never holds more than one read in memory."""

    def __init__(self, length):
        self._left = length
        self._offset = 0

    def read(self, size):
        size = min(size, self._left)
        start = self._offset % 256
        self._left -= size
        self._offset += size
        return (bytes(range(256)) * (size // 256 + 2))[start : start + size]


class _Digest(Protocol):
    def __init__(self, done):
        self.hash = hashlib.sha256()
        self.done = done

    def dataReceived(self, data):
        self.hash.update(data)

    def connectionLost(self, reason):
        self.done.callback(self.hash.hexdigest())


class MemoryTests(RelayHarness, PassThroughTestCase):
    """The relay runs as its own process (twistd) so that its memory is measured alone."""

    timeout = 120
    SIZE = 100 * 1024 * 1024
    BOUND_KIB = 20 * 1024

    @inlineCallbacks
    def test_100mb_each_way_in_bounded_memory(self):
        """100 MB up and 100 MB down through the relay raise its peak RSS by less than ~20 MB."""
        url, process = yield ensureDeferred(
            self.start_twistd(UPSTREAM=self.upstream.url, PASS_THROUGH_ROUTES="/echo*,/bytes/*")
        )
        # Warm up every code path once so that the baseline includes imports and buffers of steady state.
        yield self._upload(url, 1024 * 1024)
        yield self._download(url, 1024 * 1024)
        baseline, _ = rss_kib(process.pid)
        summary = yield self._upload(url, self.SIZE)
        self.assertEqual((summary["body_length"], summary["body_sha256"]), (self.SIZE, pattern_sha256(self.SIZE)))
        self.assertEqual((yield self._download(url, self.SIZE)), pattern_sha256(self.SIZE))
        _, peak = rss_kib(process.pid)
        rise = peak - baseline
        print(f"relay RSS baseline {baseline} KiB, peak {peak} KiB, rise {rise} KiB over 100 MB each way")
        self.assertLess(rise, self.BOUND_KIB)

    @inlineCallbacks
    def _upload(self, url, size):
        producer = RequestBodyProducer(_PatternFile(size), size)
        response = yield self.client.request("POST", url + "/echo", data=producer, unbuffered=True)
        return json.loads((yield readBody(response)))

    def _download(self, url, size):
        def digest(response):
            done = Deferred()
            response.deliverBody(_Digest(done))
            return done

        return self.client.get(url + f"/bytes/{size}", unbuffered=True).addCallback(digest)
