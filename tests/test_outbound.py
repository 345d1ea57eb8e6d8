"""
The outbound role and the whole chain over real sockets: application -> relay A -> (recording TCP forwarder) ->
relay B -> a real upstream. The forwarder keeps every byte that crossed between the relays.
"""

import hashlib
import os
import sys
import io
import json

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import FileBodyProducer, ResponseFailed, readBody
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.trial.unittest import TestCase

from mterelay.codec import RECORD_SIZE, RelayIdentity
from mterelay.demo import WireRecorder
from tests.relay_harness import Arrivals, RelayHarness, agent, raw_exchange, serve
from tests.upstream_server import pattern

TOKEN = "outbound-token-for-tests-0123456789"


class ChainTests(RelayHarness, TestCase):
    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.b_url, self.b_registry, self.b_identity = await self.start_relay(self.upstream.url)
        b_port = int(self.b_url.rsplit(":", 1)[1])
        self.recorder = WireRecorder("127.0.0.1", b_port)
        self.peer = f"http://127.0.0.1:{await serve(self, self.recorder)}"
        self.a_url, _, _ = await self.start_relay(
            self.upstream.url, outbound_token=TOKEN, allowed_peers=(self.peer,), **self.a_settings()
        )
        self.app = agent(self)

    def a_settings(self):
        return {}

    async def send(self, method, path, headers=None, data=None, peer=None, token=TOKEN):
        """The application's plain request to relay A (a bare Agent: nothing rewrites what A answers)."""
        base = {"x-mte-upstream": peer or self.peer}
        if token is not None:
            base["x-mte-outbound-token"] = token
        base.update(headers or {})
        producer = None if data is None else FileBodyProducer(io.BytesIO(data))
        response = await self.app.request(
            method.encode(),
            (self.a_url + path).encode(),
            Headers({k: v if isinstance(v, list) else [v] for k, v in base.items()}),
            producer,
        )
        return response, await treq.content(response)

    async def _no_plaintext_between_relays(self, encode_type):
        body = b'{"email": "jim.halpert@example.com", "password": "P@ssw0rd!-' + os.urandom(8).hex().encode() + b'"}'
        secrets = {
            "Authorization": "Bearer tok-" + os.urandom(8).hex(),
            "Cookie": "Cookie_1=value-" + os.urandom(8).hex(),
            "X-Custom-Secret": "custom-" + os.urandom(8).hex(),
        }
        path = "/echo/api/login-" + os.urandom(4).hex()
        query = "account=acct-" + os.urandom(4).hex()
        response, answer = await self.send(
            "POST",
            f"{path}?{query}",
            headers={**secrets, "Content-Type": "application/json", "x-mte-encode-type": encode_type},
            data=body,
        )
        self.assertEqual(response.code, 200, answer)
        echo = json.loads(answer)
        # The application gets exactly what the upstream saw and sent.
        self.assertEqual((echo["method"], echo["path"], echo["query"]), ("POST", path, query))
        self.assertEqual(echo["body_sha256"], hashlib.sha256(body).hexdigest())
        for name, value in secrets.items():
            self.assertEqual(echo["headers"][name.lower()], [value])
        self.assertEqual(echo["headers"]["content-type"], ["application/json"])
        self.assertFalse([name for name in echo["headers"] if name.startswith("x-mte-")])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        wire = self.recorder.wire
        self.assertIn(b"x-mte-relay", wire.lower())  # the recorder did see the exchange
        for plain in [path, query, body, answer, *secrets.values(), "jim.halpert"]:
            plain = plain.encode() if isinstance(plain, str) else plain
            self.assertNotIn(plain, wire)

    def test_no_plaintext_between_relays_mke(self):
        """Between A and B there is no plaintext of path, query, protected headers or bodies (MKE); the app gets
        exactly what the upstream answered."""
        return ensureDeferred(self._no_plaintext_between_relays("MKE"))

    def test_no_plaintext_between_relays_mte(self):
        """The same holds for MTE."""
        return ensureDeferred(self._no_plaintext_between_relays("MTE"))

    def test_logs_hold_no_application_path(self):
        """Relay A logs its outbound requests, under DEBUG and when refused, without the path the app sent."""

        async def run():
            lines = []

            def keep(event):
                if event.get("log_namespace") == "mterelay.web":
                    lines.append(formatEvent(event))

            globalLogPublisher.addObserver(keep)
            self.addCleanup(globalLogPublisher.removeObserver, keep)
            a_url, _, _ = await self.start_relay(
                self.upstream.url, outbound_token=TOKEN, allowed_peers=(self.peer,), debug=True
            )
            self.a_url = a_url
            response, _ = await self.send("GET", "/echo/s3cret-path-token?k=v")
            self.assertEqual(response.code, 200)
            response, _ = await self.send("GET", "/echo/s3cret-path-token", token="wrong-token")
            self.assertEqual(response.code, 401)
            self.assertEqual(len([line for line in lines if "(outbound)" in line]), 2, lines)
            self.assertNotIn("s3cret-path-token", "\n".join(lines))

        return ensureDeferred(run())

    def test_answer_is_exact(self):
        """Status, every Set-Cookie, binary bodies, redirects and 204 travel back to the application unchanged."""

        async def run():
            response, body = await self.send("GET", "/cookies/3")
            self.assertEqual(
                response.headers.getRawHeaders(b"set-cookie"), [b"c0=v0; Path=/", b"c1=v1; Path=/", b"c2=v2; Path=/"]
            )
            self.assertNotIn(b"c1=v1", self.recorder.wire)
            response, body = await self.send("GET", "/bytes/200000")
            from tests.upstream_server import pattern

            self.assertEqual((response.code, body), (200, pattern(200000)))
            self.assertEqual(response.length, 200000)  # Content-Length kept end to end
            response, body = await self.send("GET", "/redirect?to=http://elsewhere.invalid/")
            self.assertEqual(
                (response.code, response.headers.getRawHeaders(b"location")), (302, [b"http://elsewhere.invalid/"])
            )
            response, body = await self.send("DELETE", "/status/204")
            self.assertEqual((response.code, body), (204, b""))
            response, body = await self.send("HEAD", "/bytes/4096")
            # HEAD keeps the length the upstream declared (it travelled sealed), not the empty body's.
            self.assertEqual((response.code, body), (200, b""))
            self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"4096"])
            response, body = await self.send("GET", "/status/418")
            self.assertEqual(response.code, 418)

        return ensureDeferred(run())

    def test_options_from_the_product_documents(self):
        """x-mte-encode-type, -headers and -url as the product documents them all work, and never travel on."""

        async def run():
            # Long and random: a short value could turn up by chance in the base64 between the relays.
            api_key = "key-" + os.urandom(8).hex()
            for options in (
                {"x-mte-encode-type": "MTE", "x-mte-encode-headers": "false", "x-mte-encode-url": "false"},
                {
                    "x-mte-encode-type": "mke",
                    # Any token names a header, "_" and "." included.
                    "x-mte-encode-headers": "authorization,cookie,x_api.key",
                    "x-mte-encode-url": "true",
                },
            ):
                self.recorder.recorded.clear()
                headers = {**options, "Authorization": "Bearer b", "Cookie": "c=1", "x_api.key": api_key}
                response, answer = await self.send("POST", "/echo/login?x=1", headers, b"{}")
                self.assertEqual(response.code, 200, answer)
                echo = json.loads(answer)
                self.assertEqual((echo["path"], echo["headers"]["authorization"]), ("/echo/login", ["Bearer b"]))
                self.assertFalse([name for name in echo["headers"] if name.startswith("x-mte-")])
            # The last request protected its headers by name and its URL: none of them crossed in plaintext.
            self.assertEqual(echo["headers"]["x_api.key"], [api_key])
            for plain in (b"Bearer b", b"c=1", b"/echo/login", api_key.encode()):
                self.assertNotIn(plain, self.recorder.wire)

        return ensureDeferred(run())

    def test_empty_query(self):
        """A target ending in an empty query (``/echo/a?``) goes through with the URL visible or encoded, and reaches
        the upstream as ``/echo/a`` either way (an empty query is no query; Twisted's agent drops the lone "?")."""

        async def run():
            port = int(self.a_url.rsplit(":", 1)[1])
            for encode_url in ("false", "true"):
                for target, path in (("/echo/a?", "/echo/a"), ("/?", "/")):
                    self.upstream.received.clear()
                    # Raw: an Agent would drop the "?" itself.
                    head = (f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\nx-mte-upstream: {self.peer}\r\n"
                            f"x-mte-outbound-token: {TOKEN}\r\nx-mte-encode-url: {encode_url}\r\n\r\n")
                    answer = await raw_exchange(port, head.encode("ascii"))
                    self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (target, encode_url, answer[:300]))
                    self.assertEqual([(r.path, r.query) for r in self.upstream.received], [(path, "")])

        return ensureDeferred(run())

    def test_event_stream_arrives_as_sent(self):
        """
        An upstream event stream (no Content-Length) reaches the application through both relays event by event
        while it stays open, chunked (no length), and ends when it ends.
        """

        async def run():
            headers = Headers({"x-mte-upstream": [self.peer], "x-mte-outbound-token": [TOKEN]})
            response = await self.app.request(b"GET", (self.a_url + "/events").encode(), headers).addTimeout(5, reactor)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
            self.assertFalse(response.headers.hasHeader(b"content-length"))
            arrivals = Arrivals()
            done = treq.collect(response, arrivals.write)
            await arrivals.until(b"data: 0\n\n")
            self.upstream.streams[-1].write(b"data: 1\n\n")
            await arrivals.until(b"data: 0\n\ndata: 1\n\n")
            self.assertFalse(done.called)
            self.upstream.streams[-1].finish()
            await done.addTimeout(5, reactor)

        return ensureDeferred(run())

    def test_untyped_answer_stays_untyped(self):
        """An upstream answer without Content-Type reaches the application through both relays without one (not
        labelled text/html on the way)."""

        async def run():
            response, body = await self.send("GET", "/untyped")
            self.assertEqual((response.code, body), (200, b"<b>not a page</b>"))
            self.assertFalse(response.headers.hasHeader(b"content-type"))

        return ensureDeferred(run())

    def test_reason_phrase_never_crosses(self):
        """The upstream's reason phrase (free text nothing seals) does not travel between the relays: the
        application gets the standard phrase of the status."""

        async def run():
            phrase = "Locked for jim.halpert"
            response, _ = await self.send("GET", "/status/403?phrase=" + phrase.replace(" ", "%20"))
            self.assertEqual((response.code, response.phrase), (403, b"Forbidden"))
            self.assertEqual(self.upstream.received[-1].path, "/status/403")
            self.assertNotIn(b"jim.halpert", self.recorder.wire)

        return ensureDeferred(run())

    def test_refusals(self):
        """Missing or wrong token 401, a peer not in ALLOWED_PEERS 403, x-mte-upstream given twice (an allowed peer
        and another), unknown option values or a header value with a control character 400 naming the header, a
        target the peer would refuse once decoded 400; none of them reaches a peer."""

        async def run():
            cases = [
                ({"token": "wrong"}, 401, None),
                ({"peer": "http://127.0.0.1:9"}, 403, None),
                ({"peer": ["http://127.0.0.1:9", self.peer]}, 400, "x-mte-upstream"),
                ({"headers": {"x-mte-encode-type": "AES"}}, 400, "x-mte-encode-type"),
                ({"headers": {"x-mte-encode-headers": "maybe?"}}, 400, "x-mte-encode-headers"),
                ({"headers": {"x-mte-encode-url": "yes"}}, 400, "x-mte-encode-url"),
                # A header no block may carry: named by A, instead of the peer's bare 562.
                ({"headers": {"x-foo": "a\x01b"}}, 400, "X-Foo"),
            ]
            for kwargs, code, named in cases:
                response, body = await self.send("GET", "/echo/x", **kwargs)
                self.assertEqual(response.code, code, body)
                if named:
                    self.assertIn(named, json.loads(body)["message"])
            response, body = await self.send("GET", '/echo/a"b<c>')
            self.assertEqual((response.code, json.loads(body)["code"]), (400, 400))
            self.assertIn("request target", json.loads(body)["message"])
            self.assertEqual((self.recorder.recorded, self.upstream.received), ([], []))
            response, _ = await self.send("GET", "/echo/x", token="")
            self.assertEqual(response.code, 401)

        return ensureDeferred(run())

    def test_peer_restart_repairs(self):
        """When relay B loses its state (memory registry, restarted), A re-pairs and the request still succeeds."""

        async def run():
            for encode_type in ("MKE", "MTE"):
                response, _ = await self.send("POST", "/echo/1", {"x-mte-encode-type": encode_type}, b"one")
                self.assertEqual(response.code, 200)
            # Replace B's registry contents: a fresh relay B' takes over the recorder's target.
            b2_url, _, _ = await self.start_relay(self.upstream.url, identity=self.b_identity)
            self.recorder.port = int(b2_url.rsplit(":", 1)[1])
            for encode_type in ("MKE", "MTE"):
                response, body = await self.send("POST", "/echo/2", {"x-mte-encode-type": encode_type}, b"two")
                self.assertEqual(response.code, 200, body)
                self.assertEqual(json.loads(body)["body_length"], 3)

        return ensureDeferred(run())

    def test_unreachable_peer(self):
        """An allowed peer that does not listen is answered 502 with a JSON body."""

        async def run():
            self.recorder.port = 9  # discard port: nothing listens there
            response, body = await self.send("GET", "/echo/x")
            self.assertEqual(response.code, 502, body)
            self.assertEqual(json.loads(body)["code"], 502)

        return ensureDeferred(run())


class _CutAtSealedAnswer(WireRecorder):
    """Between A and B: once B's first sealed answer starts (B has taken the message), every connection from A is
    broken off instead of passing it on."""

    def __init__(self, host, port):
        super().__init__(host, port)
        self.servers = []
        self.cut = False

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.servers.append(protocol)
        return protocol

    def rewrite(self, direction, data):
        if direction == "<" and not self.cut and b"\r\nx-mte-relay:" in data.lower():
            self.cut = True
            for server in self.servers:
                server.transport.abortConnection()
            return b""
        return data


class BrokenExchangeTests(RelayHarness, TestCase):
    def test_break_after_delivery_is_reported_as_such(self):
        """A bodiless message whose connection to B breaks after B took it is answered 502 "broke off" (it may have
        been delivered), not sent again: a resent sealed message is refused as a replay, and a 563 would tell the
        application that it was never carried out."""

        async def run():
            upstream = await self.start_upstream()
            b_url, _, _ = await self.start_relay(upstream.url)
            for encode_type in ("MKE", "MTE"):
                cutter = _CutAtSealedAnswer("127.0.0.1", int(b_url.rsplit(":", 1)[1]))
                peer = f"http://127.0.0.1:{await serve(self, cutter)}"
                a_url, _, _ = await self.start_relay(upstream.url, outbound_token=TOKEN, allowed_peers=(peer,))
                upstream.received.clear()
                headers = Headers({"x-mte-outbound-token": [TOKEN], "x-mte-upstream": [peer],
                                   "x-mte-encode-type": [encode_type]})
                response = await agent(self).request(b"GET", f"{a_url}/echo/once".encode(), headers)
                body = json.loads(await readBody(response))
                self.assertEqual((response.code, body["message"]), (502, "the exchange with the peer relay broke off"))
                self.assertEqual([r.path for r in upstream.received], ["/echo/once"], encode_type)

        return ensureDeferred(run())


class PinTests(RelayHarness, TestCase):
    def test_wrong_pin_refuses(self):
        """A peer whose identity differs from PEER_PINS is refused (565) and nothing reaches its upstream."""

        async def run():
            upstream = await self.start_upstream()
            b_url, _, _ = await self.start_relay(upstream.url)
            wrong = RelayIdentity.generate().public_b64()
            a_url, _, _ = await self.start_relay(
                upstream.url, outbound_token=TOKEN, allowed_peers=(b_url,), peer_pins=((b_url, wrong),)
            )
            app = HTTPClient(agent(self))
            headers = {"x-mte-outbound-token": TOKEN, "x-mte-upstream": b_url}
            response = await app.get(a_url + "/echo/x", headers=headers)
            await response.content()
            self.assertEqual(response.code, 565)
            self.assertEqual(upstream.received, [])

        return ensureDeferred(run())

    def test_right_pin_pairs(self):
        """A peer whose identity matches PEER_PINS serves the request."""

        async def run():
            upstream = await self.start_upstream()
            b_url, _, b_identity = await self.start_relay(upstream.url)
            a_url, _, _ = await self.start_relay(
                upstream.url,
                outbound_token=TOKEN,
                allowed_peers=(b_url,),
                peer_pins=((b_url, b_identity.public_b64()),),
            )
            app = HTTPClient(agent(self))
            headers = {"x-mte-outbound-token": TOKEN, "x-mte-upstream": b_url}
            response = await app.get(a_url + "/echo/x", headers=headers)
            await response.content()
            self.assertEqual(response.code, 200)
            self.assertEqual(upstream.last.path, "/echo/x")

        return ensureDeferred(run())


class DemoTests(TestCase):
    def test_chain_demo_shows_every_hop(self):
        """``python -m mterelay.demo chain`` sends one request through A and B and prints plain text at both ends and
        only encoded traffic between the relays (it checks that itself, exiting non-zero on a leak)."""

        async def run():
            for encode_type in ("MKE", "MTE"):
                out, err, code = await getProcessOutputAndValue(
                    sys.executable, ("-m", "mterelay.demo", "chain", "--encode-type", encode_type), env=os.environ
                )
                self.assertEqual(code, 0, err)
                text = out.decode()
                self.assertIn("authorization: Bearer demo-token-123", text.split("3. The upstream")[1])
                self.assertIn("Set-Cookie: theme=dark", text.split("4. The application")[1])
                between = text.split("2. Between relay A and relay B")[1].split("3. The upstream")[0]
                self.assertIn(f",{encode_type},", between)
                self.assertNotIn("demo-token-123", between)

        return ensureDeferred(run())

    def test_upstream_on_a_taken_port_is_one_line(self):
        """``python -m mterelay.demo upstream`` on a port in use says so on one line and exits 1 (no traceback)."""
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)

        async def run():
            args = ("-m", "mterelay.demo", "upstream", "--port", str(taken.getHost().port))
            out, err, code = await getProcessOutputAndValue(sys.executable, args, env=os.environ)
            self.assertEqual(code, 1)
            self.assertTrue(err.startswith(b"mterelay.demo: error: Couldn't listen on 127.0.0.1:"), err)
            self.assertNotIn(b"Traceback", out + err)

        return ensureDeferred(run())


class _Tamperer(WireRecorder):
    """A man in the middle between A and B that replaces ``old`` by ``new`` (same length) in B's answers."""

    def __init__(self, host, port, old, new):
        super().__init__(host, port)
        self.old, self.new = old, new

    def rewrite(self, direction, data):
        return data.replace(self.old, self.new) if direction == "<" else data


async def _chain_through_tamperer(case, old, new):
    """Relays A and B with a ``_Tamperer`` between them replacing ``old`` by ``new`` in B's answers: (A's URL, peer)."""
    upstream = await case.start_upstream()
    b_url, _, _ = await case.start_relay(upstream.url)
    tamperer = _Tamperer("127.0.0.1", int(b_url.rsplit(":", 1)[1]), old, new)
    peer = f"http://127.0.0.1:{await serve(case, tamperer)}"
    a_url, _, _ = await case.start_relay(upstream.url, outbound_token=TOKEN, allowed_peers=(peer,))
    return a_url, peer


class RewrittenPhraseTests(RelayHarness, TestCase):
    def test_phrase_rewritten_between_the_relays_is_not_passed_on(self):
        """A reason phrase rewritten between the relays (it is not sealed) does not reach the application."""

        async def run():
            a_url, peer = await _chain_through_tamperer(self, b" 200 OK\r\n", b" 200 Hi\r\n")
            response = await agent(self).request(
                b"GET",
                (a_url + "/echo/x").encode(),
                Headers({b"x-mte-outbound-token": [TOKEN.encode()], b"x-mte-upstream": [peer.encode()]}),
            )
            await treq.content(response)
            self.assertEqual((response.code, response.phrase), (200, b"OK"))

        return ensureDeferred(run())


class ImpossibleLengthTests(RelayHarness, TestCase):
    def test_answer_with_impossible_length_refused(self):
        """An answer whose Content-Length no encoded body has (changed in transit) is refused by A with 562, with
        none of the upstream's headers, rather than streamed."""

        async def run():
            a_url, peer = await _chain_through_tamperer(self, b"Length: 1040\r\n", b"Length:   15\r\n")
            response = await HTTPClient(agent(self)).get(
                a_url + "/bytes/1024", headers={"x-mte-outbound-token": TOKEN, "x-mte-upstream": peer}
            )
            body = json.loads(await response.content())
            self.assertEqual((response.code, body["code"]), (562, 562))
            self.assertIn("length", body["message"])
            self.assertFalse(response.headers.hasHeader(b"x-upstream"))

        return ensureDeferred(run())


def _flip_last_byte(body):
    return body[:-1] + bytes((body[-1] ^ 1,)), b""


def _cut_after_two_records(body):
    """Keep two whole records and forge an empty final record (16 bytes) in place of the rest."""
    whole = 2 * (RECORD_SIZE + 16)
    return (body[:whole], bytes(16)) if len(body) > whole else (body, b"")


def _drop_the_final_frame(body):
    """Keep every frame of a framed body but its final one (the last 21 bytes: an empty final record's frame)."""
    return body[:-21], b""


class _FailingBalancer(Resource):
    """
    A load balancer (or a man in the middle) in front of relay B that passes the pairing endpoints (``/api/...``)
    through and answers every other request itself: by default with a chunked 502 (no content-length), as balancers
    do when their backend fails. With ``code=None`` it passes every request through, damaging the other answers'
    bodies with ``damage(body) -> (head, tail)``: the head is sent at once, the tail a moment later (so that A's
    client can read all of the head first), with a content-length that fits them.
    """

    isLeaf = True

    def __init__(
        self, backend, case, code=502, headers=(), body=b"<html>backend failed</html>", damage=_flip_last_byte
    ):
        super().__init__()
        self._backend = backend
        self._http = HTTPClient(agent(case))
        self._answer = code, headers, body
        self._damage = damage

    def render(self, request):
        flip = not request.path.startswith(b"/api/")
        if flip and self._answer[0] is not None:
            code, headers, body = self._answer
            request.setResponseCode(code)
            for name, value in headers:
                request.responseHeaders.addRawHeader(name, value)
            request.write(body)
            request.finish()
            return NOT_DONE_YET

        async def forward():
            headers = Headers(dict(request.requestHeaders.getAllRawHeaders()))
            headers.removeHeader(b"content-length")
            response = await self._http.request(
                request.method.decode(), self._backend + request.uri.decode(), headers=headers,
                data=request.content.read(),
            )
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            head, tail = await response.content(), b""
            if flip and head:
                head, tail = self._damage(head)
                request.setHeader(b"content-length", b"%d" % (len(head) + len(tail)))
            if request.method != b"HEAD":
                request.write(head)
                if tail:
                    await deferLater(reactor, 0.2, lambda: None)
                    request.write(tail)
            request.finish()

        # A failure here is logged, which fails the test (trial reports logged errors).
        ensureDeferred(forward()).addErrback(lambda failure: Logger().failure("balancer failed", failure))
        return NOT_DONE_YET


class BalancerTests(RelayHarness, TestCase):
    async def _chain(self, **answer):
        """
        Relay B behind a balancer answering ``answer`` (see ``_FailingBalancer``) and relay A reaching it: a function
        sending the application's request through them (``encode_type``, ``method`` and ``path`` as given).
        """
        self.upstream = await self.start_upstream()
        b_url, _, _ = await self.start_relay(self.upstream.url)
        peer = f"http://127.0.0.1:{await serve(self, Site(_FailingBalancer(b_url, self, **answer)))}"
        a_url, _, _ = await self.start_relay(self.upstream.url, outbound_token=TOKEN, allowed_peers=(peer,))

        def send(path, method="GET", encode_type="MKE"):
            headers = {"x-mte-outbound-token": TOKEN, "x-mte-upstream": peer, "x-mte-encode-type": encode_type}
            return HTTPClient(agent(self)).request(method, a_url + path, headers=headers)

        return send

    async def _through(self, method="GET", path="/echo/x", **answer):
        """The application's status, headers and body for a request through A and a balancer answering ``answer``."""
        response = await (await self._chain(**answer))(path, method)
        return response.code, response.headers, await response.content()

    def test_chunked_error_from_a_balancer_between_the_relays(self):
        """A balancer's own chunked 502 between A and B reaches the application as a 502 of A's own, saying where
        it came from; the balancer's page (unauthenticated) does not."""

        async def run():
            code, _, body = await self._through()
            self.assertEqual((code, json.loads(body)["message"]), (502, "the peer relay answered 502 (bad-gateway)"))
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_damaged_answer_body_is_an_error_not_a_reset(self):
        """A sealed answer whose body was changed in transit fails before any of it reached the application, which
        then gets A's JSON 562 (not a bare connection reset), with none of the upstream's opened headers."""

        async def run():
            code, headers, body = await self._through(code=None)
            self.assertEqual((code, json.loads(body)["code"]), (562, 562))
            self.assertFalse(headers.hasHeader(b"x-upstream"))
            self.assertEqual(len(self.upstream.received), 1)

        return ensureDeferred(run())

    def test_answer_cut_at_a_record_boundary_is_never_complete(self):
        """
        An answer cut after two whole records, with a forged final record and a content-length changed to match, never
        reaches the application as a complete response: A holds the second record back until the final one opens,
        so the application gets less than the length it was told, then a broken connection.
        """

        async def run():
            send = await self._chain(code=None, damage=_cut_after_two_records)
            for encode_type in ("MKE", "MTE"):
                response = await send("/bytes/300000", encode_type=encode_type)
                self.assertEqual((response.code, response.length), (200, 2 * RECORD_SIZE), encode_type)
                received = []
                await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
                self.assertEqual(b"".join(received), pattern(300000)[:RECORD_SIZE], encode_type)

        return ensureDeferred(run())

    def test_streamed_answer_without_its_final_record_is_never_complete(self):
        """
        A streamed answer (framed records) whose final record was dropped on the way, and given a content-length to
        match, reaches the application chunked and then broken off: never as a complete response.
        """

        async def run():
            send = await self._chain(code=None, damage=_drop_the_final_frame)
            for encode_type in ("MKE", "MTE"):
                response = await send("/bytes/300000?chunked=1", encode_type=encode_type)
                self.assertEqual(response.code, 200, encode_type)
                self.assertFalse(response.headers.hasHeader(b"content-length"))
                received = []
                await self.assertFailure(treq.collect(response, received.append), ResponseFailed)
                self.assertTrue(pattern(300000).startswith(b"".join(received)), encode_type)

        return ensureDeferred(run())

    def test_unsealed_answers_are_not_passed_off_as_the_upstreams(self):
        """Whatever answers between the relays without sealing (a 200 with a cookie, a redirect, a 401) never reaches
        the application as the upstream's answer: a success or redirect is 562, an error keeps only its code (401
        and 403, which would blame the application's own token or peer, become 502), and no header or body of it
        is passed on."""

        async def run():
            forged = [(b"set-cookie", b"session=attacker"), (b"location", b"http://evil.example/")]
            for status, expected in ((200, 562), (302, 562), (401, 502), (567, 567)):
                code, headers, body = await self._through(code=status, headers=forged, body=b"forged-body")
                self.assertEqual((code, json.loads(body)["code"]), (expected, expected), status)
                self.assertFalse(headers.hasHeader(b"set-cookie") or headers.hasHeader(b"location"), status)
                self.assertNotIn(b"forged", body)
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())


class ManInTheMiddleTests(RelayHarness, TestCase):
    def test_injected_answer_headers_dropped(self):
        """A header added in transit to a genuine sealed answer (a Refresh here) does not reach the application
        when the request sealed its headers: then every header of the upstream's answer travels sealed."""

        async def run():
            upstream = await self.start_upstream()
            b_url, _, _ = await self.start_relay(upstream.url)
            status = b"HTTP/1.1 200 OK\r\n"
            tamperer = _Tamperer(
                "127.0.0.1", int(b_url.rsplit(":", 1)[1]), status, status + b"Refresh: 0; url=http://evil.example/\r\n"
            )
            peer = f"http://127.0.0.1:{await serve(self, tamperer)}"
            a_url, _, _ = await self.start_relay(upstream.url, outbound_token=TOKEN, allowed_peers=(peer,))
            response = await HTTPClient(agent(self)).get(
                a_url + "/cookies/1", headers={"x-mte-outbound-token": TOKEN, "x-mte-upstream": peer}
            )
            await response.content()
            self.assertIn(status, b"".join(data for direction, data in tamperer.recorded if direction == "<"))
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"c0=v0; Path=/"])
            self.assertFalse(response.headers.hasHeader(b"refresh"))

        return ensureDeferred(run())

    def test_forged_answer_flags_refused(self):
        """An answer whose flags were changed in transit (body or header block said absent, so that a plaintext
        body or visible headers would pass for sealed ones) is refused by A with 562, never handed on."""

        async def run():
            upstream = await self.start_upstream()
            b_url, _, _ = await self.start_relay(upstream.url)
            b_port = int(b_url.rsplit(":", 1)[1])
            for old, new in ((b",0,1,1,0\r\n", b",0,1,0,0\r\n"), (b",0,1,1,0\r\n", b",0,0,1,0\r\n")):
                tamperer = _Tamperer("127.0.0.1", b_port, old, new)
                peer = f"http://127.0.0.1:{await serve(self, tamperer)}"
                a_url, _, _ = await self.start_relay(upstream.url, outbound_token=TOKEN, allowed_peers=(peer,))
                code, body = await self.raw_request(
                    a_url, "GET", "/echo/x", {"x-mte-outbound-token": TOKEN, "x-mte-upstream": peer}
                )
                self.assertEqual((code, json.loads(body)["code"]), (562, 562))
                self.assertIn(old, b"".join(data for direction, data in tamperer.recorded if direction == "<"))

        return ensureDeferred(run())


class OperatorHeadersTests(RelayHarness, TestCase):
    """Relay A's HEADERS (the operator's, often an upstream API key) between the relays."""

    setUp, _setUp, send = ChainTests.setUp, ChainTests._setUp, ChainTests.send
    #: Long and random: a short value could turn up by chance in the base64 between the relays.
    API_KEY = "api-key-" + os.urandom(12).hex()

    def a_settings(self):
        return {"headers": (("X-Api-Key", self.API_KEY),)}

    def test_sealed_whatever_the_application_asks(self):
        """HEADERS reach the upstream but never cross between the relays in plaintext, also when the application
        protects none of its headers or names others."""

        async def run():
            for mode in ("true", "false", "authorization"):
                self.recorder.recorded.clear()
                response, answer = await self.send(
                    "GET", "/echo/key", {"x-mte-encode-headers": mode, "Authorization": "Bearer b"}
                )
                self.assertEqual(response.code, 200, answer)
                self.assertEqual(json.loads(answer)["headers"]["x-api-key"], [self.API_KEY], mode)
                self.assertIn(b"x-mte-relay", self.recorder.wire.lower())
                self.assertNotIn(self.API_KEY.encode(), self.recorder.wire, mode)

        return ensureDeferred(run())
