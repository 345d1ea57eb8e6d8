"""
The inbound relay and the Python client over real sockets: client -> relay -> a real upstream, both encodings, both
registries (memory, and a real redis-server the test starts).
"""

import hashlib
import json
import os
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, Cooperator, deferLater
from treq.client import HTTPClient
from twisted.trial.unittest import TestCase

from mterelay.codec import (
    EPOCH_SIZE,
    HEADERS,
    ClientPairing,
    URL,
    RelayHeader,
    b64decode,
    b64encode,
    decode_header_block,
    encode_header_block,
    request_binding,
    response_binding,
)
from mterelay import client as client_module
from mterelay.client import RepairNeeded
from mterelay.demo import WireRecorder
from mterelay.errors import RelayError
from mterelay.redis_registry import RedisRegistry
from mterelay.registry import MemoryRegistry
from tests.relay_harness import SECRET, Arrivals, RelayHarness, agent, raw_exchange, rss_kib, serve
from tests.upstream_server import pattern, pattern_sha256

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")


class InboundTestsMixin(RelayHarness):
    """Behaviour every registry must give the relay."""

    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.relay_url, self.registry, self.identity = await self.start_relay(self.upstream.url)
        self.client = self.client_for(self.relay_url)

    def client_for(self, url, **kwargs):
        return self.client(url, **kwargs)

    async def _echo(self, method, target, encode_type, body=None, headers=None, **options):
        response = await self.client.request(
            method, target, headers=headers, data=body, encode_type=encode_type, **options
        )
        self.assertFalse(response.relay_error, response.code)
        return response, json.loads(await response.content())

    async def _every_method(self, encode_type):
        for method in METHODS:
            body = os.urandom(3000) if method in ("POST", "PUT", "PATCH") else None
            response, echo = await self._echo(method, "/echo/m?x=1&y=two", encode_type, body)
            self.assertEqual(
                (response.code, echo["method"], echo["path"], echo["query"]), (200, method, "/echo/m", "x=1&y=two")
            )
            if body is not None:
                self.assertEqual(echo["body_sha256"], hashlib.sha256(body).hexdigest())
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_every_method_mke(self):
        """GET, POST, PUT, DELETE and PATCH reach the upstream decoded in MKE, and the answers come back decoded."""
        return ensureDeferred(self._every_method("MKE"))

    def test_every_method_mte(self):
        """The same five methods work over MTE pairs (strict ratchet)."""
        return ensureDeferred(self._every_method("MTE"))

    async def _non_ascii(self):
        target = "/echo/caf%C3%A9/%E2%82%AC?q=%C3%BC&raw=%FF"
        for encode_type in ("MKE", "MTE"):
            _, echo = await self._echo("GET", target, encode_type)
            self.assertEqual((echo["path"], echo["query"]), ("/echo/caf%C3%A9/%E2%82%AC", "q=%C3%BC&raw=%FF"))

    def test_non_ascii_path_and_query(self):
        """A percent-encoded non-ASCII path and query reach the upstream byte for byte."""
        return ensureDeferred(self._non_ascii())

    async def _bodies(self):
        binary = bytes(range(256)) * 300 + b"\x00\r\n"
        for encode_type in ("MKE", "MTE"):
            _, echo = await self._echo("POST", "/echo/bin", encode_type, binary)
            self.assertEqual(
                (echo["body_length"], echo["body_sha256"]), (len(binary), hashlib.sha256(binary).hexdigest())
            )
            _, echo = await self._echo("POST", "/echo/empty", encode_type, b"")
            self.assertEqual(echo["body_length"], 0)
            response = await self.client.request("GET", "/bytes/70000", encode_type=encode_type)
            self.assertEqual(await response.content(), pattern(70000))

    def test_binary_and_empty_bodies(self):
        """Binary and empty request bodies and a multi-record response body survive both encodings exactly."""
        return ensureDeferred(self._bodies())

    async def _no_body_statuses(self):
        for status in (204, 304):
            response = await self.client.request("GET", f"/status/{status}")
            self.assertEqual((response.code, await response.content()), (status, b""))
        response = await self.client.request("HEAD", "/echo/head")
        self.assertEqual((response.code, await response.content()), (200, b""))

    def test_204_304_and_head(self):
        """204, 304 and HEAD answers come back with no body."""
        return ensureDeferred(self._no_body_statuses())

    async def _head_length(self):
        for mode in (True, False, ["x-other"]):
            response = await self.client.request("HEAD", "/bytes/4096", encode_headers=mode)
            self.assertEqual(await response.content(), b"")
            self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"4096"], mode)

    def test_head_answer_keeps_its_length_in_every_header_mode(self):
        """A HEAD answer's Content-Length (the length a GET would have) arrives sealed, even when the request
        protected none of its own headers."""
        return ensureDeferred(self._head_length())

    async def _cookies_and_redirects(self):
        response = await self.client.request("GET", "/cookies/3", encode_type="MTE")
        await response.content()
        self.assertEqual(
            response.headers.getRawHeaders(b"set-cookie"), [b"c0=v0; Path=/", b"c1=v1; Path=/", b"c2=v2; Path=/"]
        )
        response = await self.client.request("GET", "/redirect?to=http://elsewhere.invalid/next")
        await response.content()
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"http://elsewhere.invalid/next"])

    def test_set_cookies_and_redirects(self):
        """Every Set-Cookie is kept, and a redirect is handed back (decoded), not followed."""
        return ensureDeferred(self._cookies_and_redirects())

    async def _header_modes(self):
        headers = {"Authorization": "Bearer t0ken", "Cookie": "a=1", "X-Custom": "v", "Content-Type": "text/plain"}
        for mode in (True, False, ["authorization"]):
            for encode_url in (True, False):
                _, echo = await self._echo(
                    "POST", "/echo/h?q=1", "MKE", b"body", headers, encode_headers=mode, encode_url=encode_url
                )
                seen = echo["headers"]
                self.assertEqual(
                    (seen["authorization"], seen["cookie"], seen["x-custom"], seen["content-type"]),
                    (["Bearer t0ken"], ["a=1"], ["v"], ["text/plain"]),
                )
                self.assertEqual((echo["path"], echo["query"]), ("/echo/h", "q=1"))
                self.assertFalse([name for name in seen if name.startswith("x-mte-")])

    def test_header_and_url_modes(self):
        """Headers reach the upstream whether all, none or some are protected, URL encoded or not; no x-mte-* leaks."""
        return ensureDeferred(self._header_modes())

    async def _big_bodies(self):
        size = 50 * 1024 * 1024
        with tempfile.TemporaryFile() as source:
            block = os.urandom(1 << 20)
            digest = hashlib.sha256()
            for _ in range(size // len(block)):
                source.write(block)
                digest.update(block)
            source.seek(0)
            _, echo = await self._echo("PUT", "/echo/upload", "MKE", source)
            self.assertEqual((echo["body_length"], echo["body_sha256"]), (size, digest.hexdigest()))
        for target, encode_type in ((f"/bytes/{size}", "MTE"), (f"/bytes/{size}?chunked=1", "MKE")):
            response = await self.client.request("GET", target, encode_type=encode_type)
            received = hashlib.sha256()
            count = []
            await response.collect(lambda data: (received.update(data), count.append(len(data))))
            self.assertEqual((sum(count), received.hexdigest()), (size, pattern_sha256(size)), target)

    def test_50mb_upload_and_download(self):
        """A 50 MB upload (MKE) and 50 MB downloads, with a length (MTE: fixed records) and without (MKE: framed
        records), are relayed exactly."""
        return ensureDeferred(self._big_bodies())

    test_50mb_upload_and_download.timeout = 120


    async def _event_stream(self):
        for encode_type in ("MKE", "MTE"):
            # Each wait is bounded well below the relay's 30 s timeouts: a stream held back shows as a timeout here.
            response = await self.client.request("GET", "/events", encode_type=encode_type).addTimeout(5, reactor)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
            arrivals = Arrivals()
            done = response.collect(arrivals.write)
            await arrivals.until(b"data: 0\n\n")
            stream = self.upstream.streams[-1]
            stream.write(b"data: 1\n\n")
            await arrivals.until(b"data: 0\n\ndata: 1\n\n")
            self.assertFalse(done.called)
            stream.write(b"data: 2\n\n")
            stream.finish()
            await done.addTimeout(5, reactor)
            await arrivals.until(b"data: 0\n\ndata: 1\n\ndata: 2\n\n")

    async def _quiet_stream(self):
        for encode_type in ("MKE", "MTE"):
            # The head arrives while the upstream has sent nothing else (a long poll): bounded well below 30 s.
            response = await self.client.request("GET", "/events?quiet=1", encode_type=encode_type).addTimeout(
                5, reactor
            )
            self.assertEqual(response.code, 200)
            done = response.content()
            stream = self.upstream.streams[-1]
            stream.write(b"data: late\n\n")
            stream.finish()
            self.assertEqual(await done.addTimeout(5, reactor), b"data: late\n\n")

    def test_stream_head_arrives_before_its_first_event(self):
        """
        The head of an answer without Content-Length reaches the client as soon as the upstream sent it, before any
        body (a long poll, an event stream that is quiet at first), in both encodings.
        """
        return ensureDeferred(self._quiet_stream())

    def test_event_stream_arrives_as_sent(self):
        """
        An answer without Content-Length (an event stream) reaches the client event by event while the upstream
        keeps it open, in both encodings: nothing waits for a full record or for the end.
        """
        return ensureDeferred(self._event_stream())


class MemoryRegistryInboundTests(InboundTestsMixin, TestCase):
    registry_kind = "memory"


class RedisRegistryInboundTests(InboundTestsMixin, TestCase):
    registry_kind = "redis"


class RefusalTests(RelayHarness, TestCase):
    """Bad input gets a typed answer and nothing undecodable reaches the upstream."""

    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.relay_url, self.registry, self.identity = await self.start_relay(self.upstream.url)
        self.client = self.client(self.relay_url)

    def _raw(self, method, path, headers=None, data=None):
        return self.raw_request(self.relay_url, method, path, headers, data)

    def assertRefused(self, code, body, expected):
        self.assertEqual(code, expected, body)
        self.assertEqual(json.loads(body)["code"], expected)
        self.assertEqual(self.upstream.received, [])

    async def _message(
        self,
        encode_type="MKE",
        body=b"hello",
        tamper=None,
        counter=None,
        pair=None,
        url=b"/echo/x",
        block=None,
        headers_flag=True,
        answer_block=False,
    ):
        """
        A hand-built encoded POST ``url`` (on a fresh pair unless given); ``tamper(parts)`` may alter it. Returns
        ``(status, body)``, or with ``answer_block`` ``(status, the answer's opened header block)``.
        """
        token = await self.client._client_token()
        pair = pair or await self.client.pair(encode_type)
        if counter is not None:
            pair.next_counter = counter
        counter, keys, response_keys = pair.message_keys()
        header = RelayHeader(pair.state.client_id, pair.pair_id, encode_type, counter, True, headers_flag, True)
        binding = request_binding(b"POST", flags=header.flags)
        block = [(b"content-type", b"text/plain")] if block is None else block
        # A block given as bytes is sealed as it is: what no client's encode_header_block would make.
        plain_block = block if isinstance(block, bytes) else encode_header_block(block)
        parts = {
            "path": "/" + b64encode(keys.seal(URL, url, binding)),
            "relay": header.format(),
            "eh": b64encode(keys.seal(HEADERS, plain_block, binding)),
            "token": token,
        }
        encoder = keys.body_encoder(binding)
        parts["body"] = b"".join(encoder.feed(body) + encoder.finish())
        if tamper is not None:
            tamper(parts)
        headers = {"x-mte-client-id": parts["token"], "x-mte-relay": parts["relay"], "x-mte-relay-eh": parts["eh"]}
        headers = {k: v for k, v in headers.items() if v is not None}
        if not answer_block:
            return await self._raw("POST", parts["path"], headers, parts["body"])
        response = await HTTPClient(agent(self)).post(self.relay_url + parts["path"], parts["body"], headers=headers)
        await response.content()
        answer = RelayHeader.parse(response.headers.getRawHeaders(b"x-mte-relay")[0])
        sealed = b64decode(response.headers.getRawHeaders(b"x-mte-relay-eh")[0].decode("ascii"))
        opened = response_keys.open(HEADERS, sealed, response_binding(response.code, answer.flags))
        return response.code, decode_header_block(opened)

    async def _check(self, expected, **kwargs):
        code, body = await self._message(**kwargs)
        self.assertRefused(code, body, expected)

    def test_untampered_message_is_accepted(self):
        """The hand-built message the other refusal tests alter is itself accepted (so they test the alteration)."""

        async def run():
            code, body = await self._message()
            self.assertEqual(code, 200)
            self.assertEqual(self.upstream.last.path, "/echo/x")

        return ensureDeferred(run())

    def test_answer_block_names_are_lower_case(self):
        """The answer's header block names its headers in lower case in both header modes, whatever case the upstream
        wrote them in: a receiver in any language finds ``content-type`` where it looks."""

        async def run():
            for headers_flag in (True, False):
                block = None if headers_flag else []
                code, opened = await self._message(answer_block=True, headers_flag=headers_flag, block=block)
                self.assertEqual(code, 200)
                self.assertIn(b"content-type", [name for name, _ in opened])
                self.assertEqual([name for name, _ in opened if name != name.lower()], [])

        return ensureDeferred(run())

    def test_missing_header_block(self):
        """A request without its header block (the item that authenticates every request) is answered 569."""

        def drop(parts):
            parts["eh"] = None

        return ensureDeferred(self._check(569, tamper=drop))

    def test_flipped_flags(self):
        """Flags changed in transit (header block said absent, body said plain, URL said visible) are answered 562:
        the flags are bound into every item."""

        async def run():
            for index in (5, 6, 7, 8):

                def flip(parts, index=index):
                    fields = parts["relay"].split(",")
                    fields[index] = "0" if fields[index] == "1" else "1"
                    parts["relay"] = ",".join(fields)

                code, body = await self._message(tamper=flip)
                self.assertRefused(code, body, 562)

        return ensureDeferred(run())

    def test_forged_messages_change_no_state(self):
        """Forged MKE and MTE messages (right ids, wrong keys) neither burn a counter, move an epoch window, nor
        advance a ratchet: the genuine message that follows is served."""

        async def run():
            for encode_type, forged_counter in (("MKE", 60 * 65536), ("MKE", 0), ("MTE", None)):
                pair = await self.client.pair(encode_type)
                genuine = pair.state

                def forge(parts):
                    parts["eh"] = parts["eh"][:10] + ("A" if parts["eh"][10] != "A" else "B") + parts["eh"][11:]

                code, body = await self._message(encode_type, pair=pair, counter=forged_counter, tamper=forge)
                self.assertRefused(code, body, 562)
                # The client's side moved for the forged message; the genuine sender's did not.
                pair.state = genuine
                code, _ = await self._message(encode_type, pair=pair, counter=0 if encode_type == "MKE" else None)
                self.assertEqual(code, 200)
                self.upstream.received.clear()

        return ensureDeferred(run())

    def test_header_block_with_headers_flag_0(self):
        """A message whose headers flag is 0 carries an empty block (then it is relayed); a block that holds headers
        under that flag is answered 562 and nothing goes upstream, as the protocol says."""

        async def run():
            code, body = await self._message(block=[], headers_flag=False)
            self.assertEqual(code, 200, body)
            self.upstream.received.clear()
            code, body = await self._message(headers_flag=False)
            self.assertRefused(code, body, 562)

        return ensureDeferred(run())

    def test_bad_decoded_url_and_headers(self):
        """A sealed URL that is not an origin-form target, or a header block with an injected name or a CR/LF, is
        answered 562 and nothing goes upstream (an authentic client cannot send them; a broken one must not
        smuggle them)."""

        async def run():
            for url, block in (
                (b"/a b", None),
                (b"http://elsewhere/x", None),
                (b"/x\r\nHost: evil", None),
                (b"/ok", b'[["x-secret: hunter2","v"]]'),
                (b"/ok", b'[["x-a","v\\r\\nx-b: w"]]'),
            ):
                code, body = await self._message(url=url, block=block)
                self.assertRefused(code, body, 562)
                self.assertNotIn(b"hunter2", body)

        return ensureDeferred(run())

    def test_malformed_http_answered_with_json(self):
        """
        Requests that are not well-formed HTTP/1.1, or whose head is too long or has too many headers, get a JSON 400
        or 431 with the configured HEADERS, and a close; so does the target ``*`` with another method than OPTIONS
        (twisted.web would answer a bare 405).
        """

        async def run():
            url, _, _ = await self.start_relay(self.upstream.url, headers=(("x-relay-test", "1"),))
            port = int(url.rsplit(":", 1)[1])
            cases = (
                (b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
                (b"POST /echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
                (b"GET /echo/x HTTP/1.1\r\nx-mte-relay-eh: " + b"a" * 20000 + b"\r\n\r\n", 431),
                (b"GET /echo/x HTTP/1.1\r\nx-h: " + b"a" * 8000 + b"\r\nx-i: " + b"a" * 9000 + b"\r\n\r\n", 431),
                (b"GET /echo/x HTTP/1.1\r\n" + b"x-h: a\r\n" * 600 + b"\r\n", 431),
                (b"GET * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 400),
            )
            for request, code in cases:
                answer = await raw_exchange(port, request)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % code), head)
                self.assertIn(b"\r\nx-relay-test: 1", head.lower())
                self.assertEqual(json.loads(body)["code"], code)
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_pair_lookup_failing_unexpectedly_does_not_hang(self):
        """A registry whose pair lookup fails in a way it should not (a bug) while the connection waits for it, with
        reading stopped, still has the message answered (502), not left hanging."""

        class BrokenLookup(MemoryRegistry):
            def get_pair(self, client_id, pair_id):
                return deferLater(reactor, 0.01, lambda: 1 / 0)

        async def run():
            url, _, _ = await self.start_relay(self.upstream.url, registry=BrokenLookup(reactor))
            response = await RelayHarness.client(self, url).request("POST", "/echo/x", data=b"x" * 300000)
            await response.content()
            self.assertEqual((response.code, response.relay_error), (502, True))
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_unsealable_answer_names_no_header(self):
        """An upstream answer with a header no block may hold is refused with 561, whose unsealed text names no
        upstream header (that header would otherwise have crossed sealed)."""

        async def run():
            response = await self.client.request("GET", "/control/name-of-a-header")
            body = await response.content()
            self.assertEqual((response.code, response.relay_error), (561, True))
            self.assertNotIn(b"name-of-a-header", body.lower())
            self.assertEqual(json.loads(body)["code"], 561)

        return ensureDeferred(run())

    def test_refused_on_the_head_unread(self):
        """
        What the head alone shows is refused before the body is read, so that nobody can make the relay take in
        MAX_BODY_SIZE first: a missing, forged or foreign x-mte-client-id (566), a missing header block (569), a body
        on a message whose body flag is 0 (562), a pair the relay does not hold (560, looked up while the connection
        reads nothing; with Redis too). Only the head of a 200 MB body is sent: the answer comes at once.
        """

        async def run():
            token = await self.client._client_token()
            client_id = token.partition(".")[0]
            port = int(self.relay_url.rsplit(":", 1)[1])

            def relay(owner=client_id, body=True):
                return RelayHeader(owner, "pair-0001-vector", "MKE", 0, False, True, body, False).format()

            eh = "x-mte-relay-eh: AAAA\r\n"
            cases = (
                (f"x-mte-relay: {relay()}\r\n{eh}", 566),
                (f"x-mte-client-id: {'A' * 22}.{'B' * 43}\r\nx-mte-relay: {relay()}\r\n{eh}", 566),
                (f"x-mte-client-id: {token}\r\nx-mte-relay: {relay('C' * 22)}\r\n{eh}", 566),
                (f"x-mte-client-id: {token}\r\nx-mte-relay: {relay()}\r\n", 569),
                (f"x-mte-client-id: {token}\r\nx-mte-relay: {relay(body=False)}\r\n{eh}", 562),
                # Well formed, but naming a pair this relay does not hold: the registry says so before any body.
                (f"x-mte-client-id: {token}\r\nx-mte-relay: {relay()}\r\n{eh}", 560),
            )
            for headers, code in cases:
                head = f"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 200000000\r\n{headers}\r\n"
                answer = await raw_exchange(port, head.encode("ascii"))
                status, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(status.startswith(b"HTTP/1.1 %d " % code), (headers, status))
                self.assertEqual(json.loads(body)["code"], code)
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_missing_relay_header(self):
        """A request on an MTE route without x-mte-relay is answered 569."""

        def drop(parts):
            parts["relay"] = None

        return ensureDeferred(self._check(569, tamper=drop))

    def test_forged_client_id(self):
        """A client id signed with another secret is answered 566."""
        from mterelay.clientid import ClientIdSigner

        def forge(parts):
            parts["token"] = ClientIdSigner(["x" * 32]).sign(parts["token"].split(".")[0])

        return ensureDeferred(self._check(566, tamper=forge))

    def test_unknown_pair(self):
        """A pair id the relay does not know is answered 560."""

        def other_pair(parts):
            fields = parts["relay"].split(",")
            fields[2] = "unknown-pair-id-0000"
            parts["relay"] = ",".join(fields)

        return ensureDeferred(self._check(560, tamper=other_pair))

    def _flip(self, key):
        def flip(parts):
            value = parts[key]
            if isinstance(value, bytes):
                parts[key] = value[:5] + bytes([value[5] ^ 1]) + value[6:]
            else:
                parts[key] = value[:6] + ("A" if value[6] != "A" else "B") + value[7:]

        return flip

    def test_tampered_url_body_and_headers(self):
        """A changed byte in the URL, the header block or the body is answered 562; nothing reaches the upstream."""

        async def run():
            for key in ("path", "eh", "body"):
                code, body = await self._message(tamper=self._flip(key))
                self.assertRefused(code, body, 562)

        return ensureDeferred(run())

    def test_truncated_body(self):
        """A body cut short is answered 562."""

        def cut(parts):
            parts["body"] = parts["body"][:-1]

        return ensureDeferred(self._check(562, body=os.urandom(70000), tamper=cut))

    def test_replay_refused(self):
        """The same MKE message sent twice reaches the upstream once; the replay is answered 563."""

        async def run():
            sent = []

            def keep(parts):
                sent.append(dict(parts))

            code, _ = await self._message(tamper=keep)
            self.assertEqual(code, 200)
            parts = sent[0]
            headers = {"x-mte-client-id": parts["token"], "x-mte-relay": parts["relay"], "x-mte-relay-eh": parts["eh"]}
            code, body = await self._raw("POST", parts["path"], headers, parts["body"])
            self.assertEqual((code, json.loads(body)["code"], len(self.upstream.received)), (563, 563, 1))

        return ensureDeferred(run())

    def test_mte_out_of_order(self):
        """An MTE message for a later ratchet step than the relay's is answered 563."""

        def skip(parts):
            fields = parts["relay"].split(",")
            fields[4] = "1"
            parts["relay"] = ",".join(fields)

        return ensureDeferred(self._check(563, encode_type="MTE", tamper=skip))

    def test_pair_request_errors_name_the_field(self):
        """Bad pairing requests get 400 with a message naming the problem."""

        async def run():
            token = await self.client._client_token()
            headers = {"x-mte-client-id": token}
            key = b64encode(ClientPairing.start(token.split(".")[0], "p" * 20, "MKE").public_key)
            twice = {"pairId": "p" * 20, "type": "MKE", "publicKey": key}
            cases = [
                (b"not json", "JSON"),
                (b"{}", "array"),
                (b"[]", "array"),
                (json.dumps([{"pairId": "p" * 20, "type": "MKE"}]).encode(), "[0].publicKey"),
                (json.dumps([{"pairId": "p" * 20, "type": "XXX", "publicKey": "AAAA"}]).encode(), "[0]"),
                (json.dumps([{"pairId": "p" * 20, "type": "MKE", "publicKey": "!!"}]).encode(), "[0].publicKey"),
                (json.dumps([{"pairId": "bad id", "type": "MKE", "publicKey": "AAAA"}]).encode(), "pairId"),
                (json.dumps([twice, twice]).encode(), "[1].pairId repeats"),
                # JSON must be UTF-8 (json.loads alone would also take UTF-16).
                (json.dumps([twice]).encode("utf-16"), "JSON"),
            ]
            for data, field in cases:
                code, body = await self._raw("POST", "/api/mte-pair", headers, data)
                self.assertEqual(code, 400, data)
                self.assertIn(field, json.loads(body)["message"], data)
            code, body = await self._raw("POST", "/api/mte-pair", {}, b"[]")
            self.assertEqual(code, 566)

        return ensureDeferred(run())

    def test_refused_pair_request_stores_nothing(self):
        """A pairing request refused part-way (a bad item, or the client's pair limit) leaves no pair behind."""

        async def run():
            url, registry, _ = await self.start_relay(
                self.upstream.url, registry=MemoryRegistry(reactor, max_pairs_per_client=4)
            )
            token = await self.client._client_token()
            client_id = token.split(".")[0]

            def item(i):
                pairing = ClientPairing.start(client_id, f"pair-{i:016d}", "MKE")
                return {"pairId": pairing.pair_id, "type": "MKE", "publicKey": b64encode(pairing.public_key)}

            headers = {"x-mte-client-id": token}
            code, _ = await self.raw_request(url, "POST", "/api/mte-pair", headers, json.dumps([item(0)]).encode())
            self.assertEqual(code, 200)
            for items, expected in (
                ([item(i) for i in range(1, 6)], 567),
                ([item(1), item(2), {"pairId": "p" * 20, "type": "MKE"}], 400),
            ):
                code, _ = await self.raw_request(url, "POST", "/api/mte-pair", headers, json.dumps(items).encode())
                self.assertEqual(code, expected)
                self.assertEqual((await registry.get_client(client_id)).pair_count, 1)

        return ensureDeferred(run())

    def test_relay_error_bodies_hold_no_secret(self):
        """Error answers never echo the client id secret or the token."""

        async def run():
            code, body = await self._raw("GET", "/echo/x", {"x-mte-client-id": "forged.token"})
            self.assertEqual(code, 569)
            self.assertNotIn(SECRET.encode(), body)

        return ensureDeferred(run())


class _HeaderInjector(WireRecorder):
    """A man in the middle between client and relay that adds visible header lines to every encoded request."""

    def __init__(self, host, port, lines):
        super().__init__(host, port)
        self.lines = lines

    def rewrite(self, direction, data):
        if direction == ">" and b"\r\nx-mte-relay:" in data.lower():
            line, rest = data.split(b"\r\n", 1)
            return line + b"\r\n" + self.lines + rest
        return data


class InjectedHeaderTests(RelayHarness, TestCase):
    def test_visible_headers_cannot_strip_or_add_to_sealed_ones(self):
        """
        Someone on the way adds ``Connection`` naming sealed headers, and headers of their own: the sealed headers
        still reach the upstream, and none of the added ones, whether the client sealed all its headers or a list
        (whose visible headers, named in the block, still pass). Only with no header sealed (flag 0, documented as
        unprotected) do visible headers pass as sent.
        """

        async def run():
            upstream = await self.start_upstream()
            relay_url, _, _ = await self.start_relay(upstream.url)
            injector = _HeaderInjector("127.0.0.1", int(relay_url.rsplit(":", 1)[1]),
                                       b"Connection: authorization, if-match\r\nX-Api-Key: mallory\r\n")
            client = self.client(f"http://127.0.0.1:{await serve(self, injector)}")
            headers = {"Authorization": "Bearer t0ken", "If-Match": '"v1"', "X-Visible": "v"}
            for mode in (True, ["authorization", "if-match"]):
                response = await client.request("PUT", "/echo/doc", headers=headers, data=b"x", encode_headers=mode)
                seen = json.loads(await response.content())["headers"]
                self.assertEqual((seen["authorization"], seen["if-match"]), (["Bearer t0ken"], ['"v1"']), mode)
                self.assertEqual(seen["x-visible"], ["v"], mode)
                self.assertNotIn("x-api-key", seen, mode)
                self.assertFalse([name for name in seen if name.startswith("x-mte-")], mode)

        return ensureDeferred(run())


class AbandonedVerificationTests(RelayHarness, TestCase):
    def test_client_leaving_stops_the_verification(self):
        """
        A client that goes away while the relay verifies its large body stops the verification at the next record
        (Twisted closes the spooled body when the connection is lost): the rest is never decrypted and nothing
        reaches the upstream.
        """

        async def run():
            clock = Clock()
            # One record per turn of this clock, so the test acts between records.
            cooperator = Cooperator(
                terminationPredicateFactory=lambda: lambda: True, scheduler=lambda step: clock.callLater(1, step)
            )
            upstream = await self.start_upstream()
            url, _, _ = await self.start_relay(upstream.url, cooperator=cooperator)
            sending = self.client(url).request("POST", "/echo/x", data=os.urandom(4 << 20))  # 32 records
            sending.addErrback(lambda _: None)  # cancelled below
            for _ in range(500):
                if clock.getDelayedCalls():
                    break
                await deferLater(reactor, 0.01)
            clock.advance(1)
            clock.advance(1)
            sending.cancel()  # the connection is aborted
            await deferLater(reactor, 0.2)  # the relay sees it go
            turns = 0
            while clock.getDelayedCalls():
                clock.advance(1)
                turns += 1
            self.assertEqual(turns, 1)
            await deferLater(reactor, 0.1)
            self.assertEqual(upstream.received, [])

        return ensureDeferred(run())


class ContinuityTests(RelayHarness, TestCase):
    """What a relay restart or a secret rotation does to existing clients."""

    async def _restart(self, kind):
        self.registry_kind = kind
        upstream = await self.start_upstream()
        url, registry, identity = await self.start_relay(upstream.url)
        client = self.client(url)
        for encode_type in ("MKE", "MTE"):
            response = await client.request("POST", "/echo/a", data=b"1", encode_type=encode_type)
            self.assertEqual(response.code, 200)
            await response.content()
        token = client._token
        # A second relay instance (another process behind the load balancer, or this one restarted): new registry
        # object, same identity and secret; the client is sent there.
        url2, registry2, _ = await self.start_relay(
            upstream.url, registry=self.make_registry() if kind == "redis" else None, identity=identity
        )
        client.relay = url2
        for encode_type in ("MKE", "MTE"):
            response = await client.request("POST", "/echo/b", data=b"2", encode_type=encode_type)
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(await response.content())["body_length"], 1)
        return client, token, registry2

    def test_redis_restart_keeps_pairs(self):
        """On the Redis registry a new relay instance serves the existing pairs: no re-pairing, same client id."""

        async def run():
            client, token, registry2 = await self._restart("redis")
            self.assertEqual(client._token, token)
            self.assertEqual((await registry2.get_client(token.split(".")[0])).pair_count, 2)

        return ensureDeferred(run())

    def test_memory_restart_repairs(self):
        """On the memory registry the client re-pairs by itself with the new instance and the request succeeds."""

        async def run():
            client, token, registry2 = await self._restart("memory")
            self.assertEqual((await registry2.get_client(client._token.split(".")[0])).pair_count, 2)

        return ensureDeferred(run())

    def test_secret_rotation(self):
        """A client id signed by an older secret keeps working after rotation and is re-signed with the newest."""

        async def run():
            upstream = await self.start_upstream()
            url, registry, identity = await self.start_relay(upstream.url, secrets=("old-secret" * 4,))
            client = self.client(url)
            await (await client.request("GET", "/echo/1")).content()
            old = client._token
            url2, _, _ = await self.start_relay(
                upstream.url, registry=registry, identity=identity, secrets=("new-secret" * 4, "old-secret" * 4)
            )
            client.relay = url2
            response = await client.request("GET", "/echo/2")
            self.assertEqual(response.code, 200)
            await response.content()
            self.assertNotEqual(client._token, old)
            self.assertEqual(client._token.split(".")[0], old.split(".")[0])

        return ensureDeferred(run())

    def test_pin_mismatch_refuses_pairing(self):
        """A client pinned to another relay identity refuses to pair (565) and sends nothing upstream."""

        async def run():
            from mterelay.codec import RelayIdentity

            upstream = await self.start_upstream()
            url, _, _ = await self.start_relay(upstream.url)
            client = self.client(url, pin=RelayIdentity.generate().public_bytes())
            with self.assertRaises(RelayError) as ctx:
                await client.request("GET", "/echo/x")
            self.assertEqual(ctx.exception.code, 565)
            self.assertEqual(upstream.received, [])

        return ensureDeferred(run())


class RedisRefusalTests(RefusalTests):
    """The same refusals with the Redis registry, whose copies of MKE pairs add a second way to open a message."""

    registry_kind = "redis"


class ReplacedPairTests(RelayHarness, TestCase):
    """
    Two relays on one Redis, the first answering MKE pairs from its short-lived copies: a pair created again through
    the other relay (same ids, new keys) is served at once, and a message under the replaced pair's keys is refused.
    """

    registry_kind = "redis"

    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.redis = self.start_redis()
        # Copies kept for a minute, so that the test does not race their expiry.
        first = RedisRegistry.from_url(self.redis.url, reactor, pair_cache_seconds=60)
        first.startService()
        self.addCleanup(first.stopService)
        self.url, _, identity = await self.start_relay(self.upstream.url, registry=first)
        self.other, _, _ = await self.start_relay(self.upstream.url, identity=identity)
        self.client = self.client(self.url)
        response = await self.client.request("POST", "/echo/a", data=b"1")
        self.assertEqual(response.code, 200)
        await response.content()
        self.old = self.client._pools["MKE"]._shared

    async def _recreate(self):
        """Pair again through the other relay with the same pair id; the new pair's client side."""
        self.patch(client_module, "_pair_id", lambda: self.old.pair_id)
        self.client.relay = self.other
        try:
            return await self.client.pair("MKE")
        finally:
            self.client.relay = self.url

    def test_recreated_pair_served(self):
        """A message under the new pair's keys opens, though the first relay's copy still holds the old ones."""

        async def run():
            new = self.client._pools["MKE"]._shared = await self._recreate()
            response = await self.client.request("POST", "/echo/b", data=b"22")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(await response.content())["body_length"], 2)
            # Served as it was sent: the client did not have to pair again.
            self.assertIs(self.client._pools["MKE"]._shared, new)

        return ensureDeferred(run())

    def test_recreated_pair_served_past_a_later_epoch_copy(self):
        """
        The copy being of a later epoch than the new pair's counters (563 from the copy, not 562) does not refuse
        the new pair's message either: any codec refusal from a copy is checked against the stored pair.
        """

        async def run():
            for counter in (2 * EPOCH_SIZE + 5, 2 * EPOCH_SIZE + 6):  # the copy now holds epoch 2
                self.old.next_counter = counter
                response = await self.client.request("POST", "/echo/a", data=b"1")
                self.assertEqual(response.code, 200)
                await response.content()
            self.client._pools["MKE"]._shared = await self._recreate()
            received = len(self.upstream.received)
            response = await self.client._send(b"POST", b"/echo/b", [], None, 0, "MKE", True, True)
            self.assertEqual(response.code, 200)
            await response.content()
            self.assertEqual(len(self.upstream.received), received + 1)

        return ensureDeferred(run())

    def test_replaced_pair_refused(self):
        """A message under the replaced pair's keys is answered 560 (pair again) and never reaches the upstream."""

        async def run():
            await self._recreate()
            received = len(self.upstream.received)
            with self.assertRaises(RepairNeeded) as caught:
                await self.client._send(b"POST", b"/echo/c", [], None, 0, "MKE", True, True)
            self.assertEqual(caught.exception.code, 560)
            self.assertEqual(len(self.upstream.received), received)

        return ensureDeferred(run())


class RouteTests(RelayHarness, TestCase):
    """MTE_ROUTES and PASS_THROUGH_ROUTES as the product documents them, with encoded URLs."""

    def test_mte_routes_match_the_decoded_path(self):
        """With MTE_ROUTES set, an encoded URL inside them is relayed, one outside is 404 once decoded, and a
        pass-through route is proxied as is."""

        async def run():
            upstream = await self.start_upstream()
            url, _, _ = await self.start_relay(
                upstream.url, mte_routes=("/echo/v1/*",), pass_through_routes=("/status/*",)
            )
            client = self.client(url)
            response = await client.request("GET", "/echo/v1/items?id=3")
            self.assertEqual((response.code, json.loads(await response.content())["path"]), (200, "/echo/v1/items"))
            response = await client.request("GET", "/echo/v2/items")
            self.assertEqual((response.code, response.relay_error), (404, True))
            await response.content()
            self.assertEqual(len(upstream.received), 1)
            code, _ = await self.raw_request(url, "GET", "/status/201")
            self.assertEqual((code, upstream.last.path), (201, "/status/201"))

        return ensureDeferred(run())


class TwistdMemoryTests(RelayHarness, TestCase):
    """The encoded path through a relay running as its own process (``twistd mterelay``), its memory measured alone."""

    timeout = 120
    SIZE = 50 * 1024 * 1024
    BOUND_KIB = 20 * 1024

    async def _transfer(self, client, size, encode_type):
        with tempfile.TemporaryFile() as source:
            for offset in range(0, size, 1 << 20):
                source.write(pattern(min(1 << 20, size - offset)))
            source.seek(0)
            response = await client.request("PUT", "/echo/up", data=source, encode_type=encode_type)
            self.assertEqual(json.loads(await response.content())["body_sha256"], pattern_sha256(size))
        response = await client.request("GET", f"/bytes/{size}", encode_type=encode_type)
        digest = hashlib.sha256()
        await response.collect(digest.update)
        self.assertEqual(digest.hexdigest(), pattern_sha256(size))

    def test_50mb_each_way_in_bounded_memory(self):
        """50 MB up and 50 MB down, encoded both ways (MKE, then MTE), raise the relay's peak RSS by less than 20 MB."""

        async def run():
            upstream = await self.start_upstream()
            url, process = await self.start_twistd(UPSTREAM=upstream.url)
            client = self.client(url)
            for encode_type in ("MKE", "MTE"):
                await self._transfer(client, 1 << 20, encode_type)  # warm every path before the baseline
            baseline, _ = rss_kib(process.pid)
            for encode_type in ("MKE", "MTE"):
                await self._transfer(client, self.SIZE, encode_type)
            _, peak = rss_kib(process.pid)
            print(f"relay RSS baseline {baseline} KiB, peak {peak} KiB, rise {peak - baseline} KiB")
            self.assertLess(peak - baseline, self.BOUND_KIB)

        return ensureDeferred(run())
