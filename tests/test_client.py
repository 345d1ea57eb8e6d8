"""The client's command line, pools under concurrency, and the identity key generator."""

import contextlib
import gc
import io
import json
import os
import stat
import sys
from types import SimpleNamespace

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP6ServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import portforward
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from mterelay.client import MAX_SHARED_WAITERS, Client, RelayResponse, _Pool, _Shared
from mterelay.codec import CLIENT_ID_HEADER, RELAY_HEADER, RelayIdentity, b64decode, b64encode, relay_pair
from mterelay.demo import WireRecorder
from mterelay.errors import RelayError
from mterelay.keygen import main as keygen
from mterelay.registry import MemoryRegistry
from tests.relay_harness import RelayHarness, agent, serve


def run_cli(*args):
    return getProcessOutputAndValue(sys.executable, ("-m", "mterelay.client") + args, env=os.environ, reactor=reactor)


#: A well-formed client id token, as a stand-in relay hands it out.
TOKEN = b"A" * 22 + b"." + b"B" * 43


class _Answering(Resource):
    """Answers every request with ``code`` and ``headers`` and an empty body, counting them."""

    isLeaf = True

    def __init__(self, code, headers):
        super().__init__()
        self.code, self.headers, self.asked = code, headers, 0

    def render(self, request):
        self.asked += 1
        request.setResponseCode(self.code)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return b""


class ClientTests(RelayHarness, TestCase):
    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.relay_url, self.registry, self.identity = await self.start_relay(self.upstream.url)

    def test_pair_replaced_by_another_holder_of_the_client_id(self):
        """
        Someone who saw a request (the client id is a bearer token; the pair id travels in x-mte-relay) pairs the
        same pair id again: the client's next message fails to open at the relay (562), so the client pairs again
        under that id and sends the message once more; the request succeeds and reached the upstream once.
        """

        async def run():
            client = self.client(self.relay_url)
            for encode_type in ("MKE", "MTE"):
                response = await client.request("GET", "/echo/first", encode_type=encode_type)
                self.assertEqual(response.code, 200)
                await response.content()
                pool = client._pools[encode_type]
                pair_id = (pool._shared or pool._idle[0]).pair_id
                intruder = self.client(self.relay_url)
                intruder._token = client._token
                await intruder.pair(encode_type, pair_id)
                self.upstream.received.clear()
                response = await client.request("POST", "/echo/second", data=b"body", encode_type=encode_type)
                self.assertEqual((response.code, response.relay_error), (200, False), encode_type)
                self.assertEqual(json.loads(await response.content())["body_length"], 4)
                self.assertEqual([r.path for r in self.upstream.received], ["/echo/second"])

        return ensureDeferred(run())

    def test_used_up_pair_is_paired_again(self):
        """An MKE pair the client has used up (2^32 messages: the relay would answer 564) is paired again under its
        id and the request goes out on the new pair, instead of every later request failing on the old one."""

        async def run():
            client = self.client(self.relay_url)
            response = await client.request("GET", "/echo/first")
            await response.content()
            pool = client._pools["MKE"]
            used = pool._shared
            used.next_counter = 1 << 32
            response = await client.request("GET", "/echo/second")
            self.assertEqual((response.code, json.loads(await response.content())["path"]), (200, "/echo/second"))
            self.assertIsNot(pool._shared, used)
            self.assertEqual(pool._shared.pair_id, used.pair_id)

        return ensureDeferred(run())

    def test_pin_as_keygen_prints_it(self):
        """A pin given as the base64url text that keygen prints (and the start-up line shows) works; a different
        key refuses the pairing (565); a pin that is not base64url is a ValueError at once."""

        async def run():
            client = self.client(self.relay_url, pin=self.identity.public_b64())
            response = await client.request("GET", "/echo/pinned")
            self.assertEqual(response.code, 200)
            await response.content()
            other = self.client(self.relay_url, pin=RelayIdentity.generate().public_b64())
            with self.assertRaises(RelayError) as ctx:
                await other.request("GET", "/echo/x")
            self.assertEqual(ctx.exception.code, 565)
            self.assertRaises(ValueError, self.client, self.relay_url, pin="not base64!")

        return ensureDeferred(run())

    def test_cli_like_curl(self):
        """``python -m mterelay.client URL -d DATA -H ...`` prints the decoded upstream answer."""

        async def run():
            out, err, code = await run_cli(
                self.relay_url + "/anything?x=1", "-d", "hello", "-H", "Authorization: Bearer z", "--encode-type", "MTE"
            )
            self.assertEqual(code, 0, err)
            echo = json.loads(out)
            self.assertEqual((echo["method"], echo["path"], echo["query"]), ("POST", "/anything", "x=1"))
            self.assertEqual((echo["body_length"], echo["headers"]["authorization"]), (5, ["Bearer z"]))

        return ensureDeferred(run())

    def test_cli_pin(self):
        """``--pin`` with the relay's key works; with another key the CLI fails with 565 and nothing goes upstream."""

        async def run():
            out, err, code = await run_cli(self.relay_url + "/echo/pinned", "--pin=" + self.identity.public_b64())
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out)["path"], "/echo/pinned", out)
            self.upstream.received.clear()
            out, err, code = await run_cli(self.relay_url + "/x", "--pin=" + RelayIdentity.generate().public_b64())
            self.assertEqual((code, out), (1, b""))
            self.assertIn(b"565", err)
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_cli_unreachable_relay_is_one_line(self):
        """A relay that refuses the connection is reported on one line with status 1, not with a traceback."""

        async def run():
            port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
            address = port.getHost()
            await port.stopListening()
            out, err, code = await run_cli(f"http://127.0.0.1:{address.port}/x", "-d", "secret-body")
            self.assertEqual((code, out), (1, b""))
            self.assertTrue(err.startswith(b"mterelay.client: error: cannot reach the relay:"), err)
            self.assertEqual(err.count(b"\n"), 1, err)

        return ensureDeferred(run())

    def test_cli_connection_cut_after_sending_is_not_unreachable(self):
        """A connection cut once the message was sent (the relay died) is reported as a connection that failed before
        the answer ended, never as a relay it could not reach: the message may have been delivered. (Twisted's pool
        would send it again on a new connection, and report that one's refusal.)"""

        async def run():
            relay_port = int(self.relay_url.rsplit(":", 1)[1])
            factory = portforward.ProxyFactory("127.0.0.1", relay_port)
            cut = Deferred()

            class CutAtMessage(portforward.ProxyServer):
                def dataReceived(self, data):
                    super().dataReceived(data)
                    if data.startswith(b"GET ") and not cut.called:
                        cut.callback(self)

            factory.protocol = CutAtMessage
            front = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(lambda: front.stopListening() if front.connected else None)

            async def die(server):
                await front.stopListening()
                server.transport.abortConnection()

            cut.addCallback(lambda server: ensureDeferred(die(server)))
            out, err, code = await run_cli(f"http://127.0.0.1:{front.getHost().port}/echo/once")
            self.assertEqual((code, out), (1, b""))
            expected = b"mterelay.client: error: the connection to the relay failed before the answer ended\n"
            self.assertEqual(err, expected)

        return ensureDeferred(run())

    def test_cli_bad_arguments_are_usage_errors(self):
        """A bad URL, pin, header or body file is a usage error (status 2) naming the argument; nothing is sent."""

        async def run():
            cases = [
                (("not-a-url",), b"argument url: expected an http(s) URL"),
                ((self.relay_url + "/x", "--pin", "!!"), b"argument --pin: expected"),
                ((self.relay_url + "/x", "-H", "no-colon"), b"-H 'no-colon' is not 'Name: value'"),
                ((self.relay_url + "/x", "-d", "@" + self.mktemp()), b"No such file or directory"),
            ]
            for args, message in cases:
                out, err, code = await run_cli(*args)
                self.assertEqual((code, out), (2, b""), args)
                self.assertIn(message, err)
                self.assertNotIn(b"Traceback", err)
            self.assertEqual(self.upstream.received, [])

        return ensureDeferred(run())

    def test_cli_shows_a_stream_as_it_arrives(self):
        """The CLI writes each piece of an event stream out as it arrives (its output a pipe, Python unbuffered or
        not), like curl: the first event shows while the stream is still open."""
        first, ended = Deferred(), Deferred()

        class Reader(ProcessProtocol):
            out = b""

            def childDataReceived(self, fd, data):
                if fd == 1:
                    self.out += data
                    if b"data: 0" in self.out and not first.called:
                        first.callback(None)

            def processEnded(self, reason):
                ended.callback((reason.value.exitCode, self.out))

        async def run():
            env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
            args = (sys.executable, "-m", "mterelay.client", self.relay_url + "/events", "-i")
            reactor.spawnProcess(Reader(), sys.executable, args, env=env)
            await first.addTimeout(20, reactor)
            stream = self.upstream.streams[-1]
            stream.write(b"data: 1\n\n")
            stream.finish()
            code, out = await ended.addTimeout(20, reactor)
            self.assertEqual(code, 0)
            self.assertTrue(out.startswith(b"HTTP 200 OK\r\n"), out)
            self.assertTrue(out.endswith(b"\r\n\r\ndata: 0\n\ndata: 1\n\n"), out)

        return ensureDeferred(run())

    def test_cli_reader_going_away_ends_quietly(self):
        """When whatever reads the output closes it early (``| head``), the CLI exits 1 without a traceback."""
        ended = Deferred()

        class FirstBytesOnly(ProcessProtocol):
            err = b""

            def childDataReceived(self, fd, data):
                if fd == 1:
                    self.transport.closeChildFD(1)
                else:
                    self.err += data

            def processEnded(self, reason):
                ended.callback((reason.value.exitCode, self.err))

        args = (sys.executable, "-m", "mterelay.client", self.relay_url + "/bytes/4194304")
        reactor.spawnProcess(FirstBytesOnly(), sys.executable, args, env=os.environ)

        def check(result):
            self.assertEqual(result, (1, b""))

        return ended.addCallback(check)

    def test_mte_pool_bounded_under_concurrency(self):
        """Twenty concurrent MTE requests through a pool of three pairs all succeed, over at most three pairs."""

        async def run():
            client = self.client(self.relay_url, pool_size=3)

            async def one(i):
                response = await client.request("POST", f"/echo/{i}", data=b"%d" % i, encode_type="MTE")
                return json.loads(await response.content())["path"]

            paths = await gatherResults([ensureDeferred(one(i)) for i in range(20)])
            self.assertEqual(sorted(paths), sorted(f"/echo/{i}" for i in range(20)))
            self.assertLessEqual((await self.registry.get_client(client._token.split(".")[0])).pair_count, 3)

        return ensureDeferred(run())

    async def _window_ahead(self):
        """A client whose MKE pair's next counter (1) lies behind the relay's window (moved to 5000)."""
        client = self.client(self.relay_url)
        pair = await client._pools["MKE"].acquire()
        pair.next_counter = 5000
        self.assertEqual((await client.request("GET", "/echo/ahead")).code, 200)
        pair.next_counter = 1
        return client, pair

    def test_counter_behind_the_window_sent_again(self):
        """
        An MKE message whose counter fell behind the relay's window while it was sent (a long upload beside many
        short requests) is refused with 563 before the upstream sees it, and the client sends it once more.
        """

        async def run():
            client, pair = await self._window_ahead()
            sending = client.request("POST", "/echo/late", data=b"x" * 1000)  # reserves counter 1 at once
            pair.next_counter = 5001  # the counters the other requests took meanwhile
            response = await sending
            self.assertEqual(json.loads(await response.content())["body_length"], 1000)
            self.assertEqual([r.path for r in self.upstream.received], ["/echo/ahead", "/echo/late"])

        return ensureDeferred(run())

    def test_bodiless_message_refused_563_not_sent_again(self):
        """
        A bodiless MKE message refused with 563 is not sent again under a new counter: it cannot have fallen behind
        the window while it was sent, so the refusal most likely met a copy resent by the connection pool after the
        relay had taken the first (and sending it again would deliver it twice).
        """

        async def run():
            client, pair = await self._window_ahead()
            response = await client.request("DELETE", "/echo/late")
            self.assertEqual(json.loads(await response.content())["code"], 563)
            self.assertEqual((response.relay_error, pair.next_counter), (True, 2))
            self.assertEqual([r.path for r in self.upstream.received], ["/echo/ahead"])

        return ensureDeferred(run())

    def test_headers_too_many_or_too_long_to_encode(self):
        """
        Request headers a block cannot hold are refused before anything is sent (431), a request head too long for
        the relay is answered 431 by the relay, and an upstream answer with more headers than a block holds is
        answered 561 instead of an answer the client refuses; up to the bounds, long headers pass both ways.
        """

        async def run():
            client = self.client(self.relay_url)
            for headers in ([(b"x-h", b"v")] * 300, {"cookie": "c" * 12000}):
                with self.assertRaises(RelayError) as ctx:
                    await client.request("GET", "/echo/x", headers=headers)
                self.assertEqual(ctx.exception.code, 431)
            # Within the block's bounds, but the whole head (the encoded URL too) is over what the relay reads.
            response = await client.request("GET", "/echo/" + "p" * 4000, headers={"cookie": "c" * 11000})
            self.assertEqual((response.code, (await response.json())["code"]), (431, 431))
            self.assertEqual(self.upstream.received, [])
            response = await client.request("GET", "/echo/x", headers={"cookie": "c" * 11000})
            self.assertEqual(json.loads(await response.content())["headers"]["cookie"], ["c" * 11000])
            for encode_type in ("MKE", "MTE"):
                for path in ("/cookies/300", "/cookies/1?pad=12000"):
                    response = await client.request("GET", path, encode_type=encode_type)
                    self.assertEqual((response.code, (await response.json())["code"]), (561, 561))
                response = await client.request("GET", "/cookies/1?pad=10000", encode_type=encode_type)
                self.assertEqual(len(response.headers.getRawHeaders("set-cookie")[0]), len("c0=v0; Path=/") + 10000)
                await response.content()
                response = await client.request("GET", "/cookies/200", encode_type=encode_type)
                self.assertEqual((response.code, len(response.headers.getRawHeaders("set-cookie"))), (200, 200))
                await response.content()

        return ensureDeferred(run())

    def test_dropped_mte_pairs_do_not_pile_up_at_the_relay(self):
        """
        MTE pairs dropped after relay errors are paired again under their ids, so the relay holds no more pairs for
        the client than its pool: a relay error per request, many times over, never reaches the relay's per-client
        limit (567), and requests after them are served.
        """

        async def run():
            url, registry, _ = await self.start_relay(
                self.upstream.url, registry=MemoryRegistry(reactor, max_pairs_per_client=3)
            )
            client = self.client(url, pool_size=2)
            for _ in range(8):
                response = await client.request("GET", "/cookies/300", encode_type="MTE")  # 561: pair dropped
                self.assertEqual(json.loads(await response.content())["code"], 561)
            response = await client.request("GET", "/echo/after", encode_type="MTE")
            self.assertEqual(json.loads(await response.content())["path"], "/echo/after")
            self.assertLessEqual((await registry.get_client(client._token.split(".")[0])).pair_count, 2)

        return ensureDeferred(run())

    def test_relay_that_lost_its_pairs_is_paired_again_at_once(self):
        """
        When the relay no longer knows an MTE pair (560, a restart without Redis), the pool drops its other idle
        pairs too: the request is served on its one retry, instead of failing on the next stale pair.
        """

        async def run():
            client = self.client(self.relay_url, pool_size=3)
            await gatherResults([client.request("GET", "/slow/0.2", encode_type="MTE") for _ in range(3)])
            client_id = client._token.split(".")[0]
            for pair in client._pools["MTE"]._idle:
                await self.registry.delete_pair(client_id, pair.pair_id)
            response = await client.request("GET", "/echo/after", encode_type="MTE")
            self.assertEqual(json.loads(await response.content())["path"], "/echo/after")

        return ensureDeferred(run())

    def test_discovery_follows_no_redirect_and_takes_no_malformed_client_id(self):
        """
        Discovery is answered by the configured relay or fails (502): a redirect is not followed (the other host is
        never asked), and a malformed client id is not taken (it would break every later request).
        """

        async def run():
            elsewhere = _Answering(200, [(CLIENT_ID_HEADER, TOKEN)])
            other = f"http://127.0.0.1:{await serve(self, Site(elsewhere))}"
            redirect = (302, [(b"location", other.encode() + b"/api/mte-relay")])
            for code, headers in (redirect, (200, [(CLIENT_ID_HEADER, b"a")])):
                fake = f"http://127.0.0.1:{await serve(self, Site(_Answering(code, headers)))}"
                with self.assertRaises(RelayError) as ctx:
                    await self.client(fake).request("GET", "/x")
                self.assertEqual(ctx.exception.code, 502, code)
            self.assertEqual(elsewhere.asked, 0)
            # The same client takes a well-formed id (the test's own stand-in answers discovery alike).
            self.assertEqual(await self.client(other)._client_token(), TOKEN.decode())

        return ensureDeferred(run())

    def test_pairing_answer_that_fails_hands_out_no_client_id(self):
        """A pairing answer that does not verify (565) cannot swap the client's id for the one it carries: only a
        genuine pairing (or message) answer may re-sign it."""

        class ForgedPairing(_Answering):
            def render(self, request):
                if request.method == b"POST":
                    self.headers = [(CLIENT_ID_HEADER, b"C" * 22 + b"." + b"D" * 43)]
                return super().render(request)

        async def run():
            fake = f"http://127.0.0.1:{await serve(self, Site(ForgedPairing(200, [(CLIENT_ID_HEADER, TOKEN)])))}"
            client = self.client(fake)
            with self.assertRaises(RelayError) as ctx:
                await client.pair("MKE")
            self.assertEqual(ctx.exception.code, 565)
            self.assertEqual(await client._client_token(), TOKEN.decode())

        return ensureDeferred(run())

    def test_malformed_pairing_answers_are_565(self):
        """A pairing answer nested past the parser's recursion limit, or JSON in UTF-16, is a malformed answer
        (565), not an exception escaping the client."""

        class Answer(Resource):
            isLeaf = True

            def __init__(self, body):
                super().__init__()
                self.body = body

            def render(self, request):
                request.setHeader(CLIENT_ID_HEADER, TOKEN)
                return self.body

        async def run():
            genuine = json.dumps({"identity": "x", "pairs": []})
            for body in (b"[" * 30000 + b"]" * 30000, genuine.encode("utf-16")):
                client = self.client(f"http://127.0.0.1:{await serve(self, Site(Answer(body)))}")
                with self.assertRaises(RelayError) as ctx:
                    await client.pair("MKE")
                self.assertEqual(ctx.exception.code, 565)

        return ensureDeferred(run())

    def test_client_id_injected_on_the_way_is_not_taken(self):
        """
        A foreign (well-formed) client id added on the way to a genuine pairing answer and to a genuine message
        answer is not taken: every request succeeds, in both encodings (taking it had every later MKE request refused
        566, for good).
        """
        other = b"C" * 22 + b"." + b"D" * 43

        class Injector(WireRecorder):
            armed = False

            def rewrite(self, direction, data):
                # Last among the answer's headers: the one a client reads.
                if self.armed and direction == "<" and data.startswith(b"HTTP/1.1 200 OK\r\n"):
                    return data.replace(b"\r\n\r\n", b"\r\n" + CLIENT_ID_HEADER + b": " + other + b"\r\n\r\n", 1)
                return data

        async def run():
            port = int(self.relay_url.rsplit(":", 1)[1])
            injector = Injector("127.0.0.1", port)
            client = self.client(f"http://127.0.0.1:{await serve(self, injector)}")
            # Discovery, the one answer that may hand out a new id, is left alone; every later answer is tampered with.
            await client._client_token()
            mine, injector.armed = client._token, True
            for encode_type in ("MKE", "MTE", "MKE", "MTE"):
                response = await client.request("GET", "/echo/x", encode_type=encode_type)
                self.assertEqual(response.code, 200, encode_type)
                await response.content()
            self.assertEqual(client._token, mine)

        return ensureDeferred(run())

    def test_late_566_keeps_the_client_id_taken_since(self):
        """A 566 that answers a pairing sent under a client id the client has since dropped and replaced (another
        request's 566 came first) does not drop the new id too: requests already under it would fail 566 again."""
        first, second = b"A" * 22 + b"." + b"B" * 43, b"C" * 22 + b"." + b"D" * 43

        class Relay(Resource):
            isLeaf = True

            def __init__(self):
                super().__init__()
                self.tokens, self.held = [first, second], Deferred()

            def render(self, request):
                if request.method == b"HEAD":
                    request.setHeader(CLIENT_ID_HEADER, self.tokens.pop(0))
                    return b""
                self.held.callback(request)
                return NOT_DONE_YET

        async def run():
            relay = Relay()
            client = self.client(f"http://127.0.0.1:{await serve(self, Site(relay))}")
            pairing = ensureDeferred(client.pair("MKE"))
            held = await relay.held.addTimeout(5, reactor)
            client._forget_client()
            self.assertEqual(await client._client_token(), second.decode())
            held.setResponseCode(566)
            held.finish()
            with self.assertRaises(RelayError) as ctx:
                await pairing
            self.assertEqual(ctx.exception.code, 566)
            self.assertEqual(client._token, second.decode())

        return ensureDeferred(run())

    def test_relay_at_an_ipv6_literal(self):
        """A relay named by an IPv6 literal (``http://[::1]:port``) is discovered like any other."""

        async def run():
            port = await TCP6ServerEndpoint(reactor, 0, interface="::1").listen(
                Site(_Answering(200, [(CLIENT_ID_HEADER, TOKEN)]))
            )
            self.addCleanup(port.stopListening)
            client = self.client(f"http://[::1]:{port.getHost().port}")
            self.assertEqual(await client._client_token(), TOKEN.decode())

        return ensureDeferred(run())

    def test_cancelled_waiter_leaves_pool_whole(self):
        """A request cancelled while it waits for an MTE pair (its application went away) neither loses the pair nor
        stalls later requests; a wait longer than the client's timeout is answered 503."""

        async def run():
            client = self.client(self.relay_url, pool_size=1, timeout=5)
            first = client.request("GET", "/slow/0.3", encode_type="MTE")
            waiting = client.request("GET", "/echo/never", encode_type="MTE")
            waiting.cancel()
            self.failureResultOf(waiting)
            self.assertEqual((await first).code, 200)
            for i in range(3):
                response = await client.request("GET", f"/echo/{i}", encode_type="MTE")
                self.assertEqual(json.loads(await response.content())["path"], f"/echo/{i}")
            self.assertNotIn("/echo/never", [r.path for r in self.upstream.received])
            impatient = self.client(self.relay_url, pool_size=1, timeout=0.2)
            slow = impatient.request("GET", "/slow/1", encode_type="MTE")
            with self.assertRaises(RelayError) as ctx:
                await impatient.request("GET", "/echo/late", encode_type="MTE")
            self.assertEqual(ctx.exception.code, 503)
            with self.assertRaises(RelayError):
                await slow  # the relay itself is slower than this client's timeout: 504

        return ensureDeferred(run())

    def test_mke_pair_shared_by_concurrent_requests(self):
        """Fifty concurrent MKE requests share one pair, each with its own counter."""

        async def run():
            client = self.client(self.relay_url)
            responses = await gatherResults([client.request("GET", f"/echo/{i}") for i in range(50)])
            for response in responses:
                self.assertEqual(response.code, 200)
                await response.content()
            self.assertEqual((await self.registry.get_client(client._token.split(".")[0])).pair_count, 1)

        return ensureDeferred(run())


class _Proxy(Resource):
    """
    Stands between a client and ``relay``: passes every request on and its answer back, holding pairing answers for
    ``pairing_delay`` seconds (a slow network or a busy relay). With ``refusing`` set, it answers the next encoded
    message itself with a 560 whose head comes at once and whose body never does (and fires ``refused``).
    """

    isLeaf = True

    def __init__(self, case, relay):
        super().__init__()
        self.relay, self.http = relay, HTTPClient(agent(case))
        self.pairing_delay, self.refusing, self.refused = 0, False, Deferred()
        self.seen, self.paired, self.forwarding = [], 0, []
        # The forwards still going on end (their client gone or not) before the proxy's connections are closed.
        case.addCleanup(lambda: gatherResults(self.forwarding))

    def render(self, request):
        self.seen.append(request.path)
        if self.refusing and request.requestHeaders.hasHeader(RELAY_HEADER):
            self.refusing = False
            request.setResponseCode(560)
            request.setHeader(b"content-length", b"100")
            request.write(b"")
            self.refused.callback(None)
            return NOT_DONE_YET
        self.forwarding.append(ensureDeferred(self._forward(request)))
        return NOT_DONE_YET

    async def _forward(self, request):
        headers = request.requestHeaders.copy()
        for name in (b"host", b"content-length"):
            headers.removeHeader(name)
        url = self.relay + request.uri.decode("ascii")
        method = request.method.decode("ascii")
        response = await self.http.request(method, url, headers=headers, data=request.content.read() or None)
        body = await response.content()
        if request.path == b"/api/mte-pair":
            self.paired += 1
            await deferLater(reactor, self.pairing_delay)
        if request.channel is None:
            return  # the client gave up
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


async def _until(condition):
    """Wait until ``condition()`` holds (within 5 s)."""
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("the condition did not come true within 5 s")


class AbandonedExchangeTests(RelayHarness, TestCase):
    """A client that gives up on an exchange (timed out, or its application went away) leaves nothing behind."""

    def setUp(self):
        return ensureDeferred(self._setUp())

    async def _setUp(self):
        self.upstream = await self.start_upstream()
        self.registry = MemoryRegistry(reactor, max_pairs_per_client=2)
        relay_url, _, _ = await self.start_relay(self.upstream.url, registry=self.registry)
        self.proxy = _Proxy(self, relay_url)
        self.url = f"http://127.0.0.1:{await serve(self, Site(self.proxy))}"

    async def _pair_count(self, client):
        return (await self.registry.get_client(client._token.split(".")[0])).pair_count

    def test_timed_out_pairings_do_not_pile_up_at_the_relay(self):
        """
        Pairings whose answers come later than the client's timeout are stored by the relay all the same. The next
        pairing uses the same pair id (replacing that pair) rather than a new one, so the relay holds one pair for
        the client however many pairings timed out: they never reach its per-client limit (567), and once the relay
        answers in time again requests are served.
        """

        async def run():
            self.proxy.pairing_delay = 0.6
            for encode_type in ("MKE", "MTE"):
                client = self.client(self.url, pool_size=1, timeout=0.3)
                for _ in range(3):
                    with self.assertRaises(RelayError) as ctx:
                        await client.request("GET", "/echo/late", encode_type=encode_type)
                    self.assertEqual(ctx.exception.code, 504)
                self.proxy.pairing_delay = 0
                response = await client.request("GET", "/echo/after", encode_type=encode_type)
                self.assertEqual(json.loads(await response.content())["path"], "/echo/after")
                self.assertEqual(await self._pair_count(client), 1, encode_type)
                self.proxy.pairing_delay = 0.6

        return ensureDeferred(run())

    def test_cancelled_pairings_do_not_pile_up_at_the_relay(self):
        """
        MTE requests cancelled while their pairing is under way (the application went away; the relay stores the
        pair all the same) leave one pair at the relay: the next pairing replaces it under the same pair id, so the
        client's pairings are not refused with 567 afterwards.
        """

        async def run():
            self.proxy.pairing_delay = 0.6
            client = self.client(self.url, pool_size=1)
            for i in range(3):
                request = client.request("GET", "/echo/gone", encode_type="MTE")
                await _until(lambda: self.proxy.paired > i)  # the relay stored the pair; its answer is on its way
                request.cancel()
                self.failureResultOf(request)  # its pairing's exchange was cancelled: ResponseNeverReceived
            self.proxy.pairing_delay = 0
            response = await client.request("GET", "/echo/after", encode_type="MTE")
            self.assertEqual(json.loads(await response.content())["path"], "/echo/after")
            self.assertEqual(await self._pair_count(client), 1)
            self.assertEqual([r.path for r in self.upstream.received], ["/echo/after"])

        return ensureDeferred(run())

    def test_cancelled_while_reading_off_a_refusal(self):
        """
        A request cancelled while the client reads off the body of a re-pair refusal (560) fails with the
        cancellation: nothing more is sent (no new pairing, the message is not sent again), so nothing reaches the
        upstream after the application went away. The pool is left whole: the next request is served.
        """

        async def run():
            for encode_type in ("MKE", "MTE"):
                client = self.client(self.url, pool_size=1, timeout=5)
                await (await client.request("GET", "/echo/first", encode_type=encode_type)).content()
                self.upstream.received.clear()
                self.proxy.refusing, self.proxy.refused = True, Deferred()
                request = client.request("DELETE", "/echo/gone", encode_type=encode_type)
                await self.proxy.refused
                await deferLater(reactor, 0.1)  # the refusal's head reaches the client, which reads off its body
                asked = len(self.proxy.seen)
                request.cancel()
                with self.assertRaises(CancelledError):
                    await request
                await deferLater(reactor, 0.1)
                self.assertEqual(len(self.proxy.seen), asked, encode_type)
                self.assertEqual(self.upstream.received, [], encode_type)
                response = await client.request("GET", "/echo/after", encode_type=encode_type)
                self.assertEqual(json.loads(await response.content())["path"], "/echo/after")

        return ensureDeferred(run())


class _StallingRelay(Resource):
    """A relay that hands out a client id, then answers pairing with the head and one byte of a 100-byte body, or
    (``big``) with 100 KB of body."""

    isLeaf = True

    def __init__(self, big=False):
        super().__init__()
        self._big = big

    def render_HEAD(self, request):
        request.setHeader(CLIENT_ID_HEADER, b"stalling-client-0123456789.signature")
        return b""

    def render_POST(self, request):
        if self._big:
            return b"x" * 100_000
        request.setHeader(b"content-length", b"100")
        request.write(b"{")
        return NOT_DONE_YET


class SmallAnswerTests(RelayHarness, TestCase):
    def test_stalled_pairing_answer_times_out_every_time(self):
        """A pairing answer that stalls mid-body fails each request within the client's timeout (504)."""

        async def run():
            port = await serve(self, Site(_StallingRelay()))
            client = self.client(f"http://127.0.0.1:{port}", timeout=0.5)
            for encode_type in ("MKE", "MKE", "MTE"):
                started = reactor.seconds()
                with self.assertRaises(RelayError) as ctx:
                    await client.request("GET", "/x", encode_type=encode_type)
                self.assertEqual(ctx.exception.code, 504)
                self.assertLess(reactor.seconds() - started, 5)

        return ensureDeferred(run())

    def test_oversized_pairing_answer_refused(self):
        """A pairing answer longer than MAX_SMALL_ANSWER is refused (502) without being read whole."""

        async def run():
            port = await serve(self, Site(_StallingRelay(big=True)))
            client = self.client(f"http://127.0.0.1:{port}", timeout=5)
            with self.assertRaises(RelayError) as ctx:
                await client.pair("MKE")
            self.assertEqual(ctx.exception.code, 502)
            self.assertIn("longer than", ctx.exception.detail)
            await deferLater(reactor, 0.1)  # the dropped connection settles before the pool is closed

        return ensureDeferred(run())


class SharedPairingTests(SynchronousTestCase):
    """Concurrent requests share one discovery or MKE pairing; one of them going away does not fail the others."""

    def setUp(self):
        self.pairings, self.asked_ids = [], []
        self.pool = _Pool("MKE", 1, self._make_pair, Clock(), 5)

    def _make_pair(self, pair_id):
        self.asked_ids.append(pair_id)
        self.pairings.append(Deferred())
        return self.pairings[-1]

    def test_cancelled_caller_leaves_the_others_their_pair(self):
        """The first caller is cancelled during the pairing: the second still gets the pair, and it is kept."""
        first, second = ensureDeferred(self.pool.acquire()), ensureDeferred(self.pool.acquire())
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        pair = object()
        self.pairings[0].callback(pair)
        self.assertIs(self.successResultOf(second), pair)
        self.assertIs(self.successResultOf(ensureDeferred(self.pool.acquire())), pair)
        self.assertEqual(len(self.pairings), 1)

    def test_pair_kept_when_every_caller_went_away(self):
        """A pairing whose callers were all cancelled still completes and serves the next request."""
        only = ensureDeferred(self.pool.acquire())
        only.cancel()
        self.failureResultOf(only, CancelledError)
        pair = object()
        self.pairings[0].callback(pair)
        self.assertIs(self.successResultOf(ensureDeferred(self.pool.acquire())), pair)
        self.assertEqual(len(self.pairings), 1)

    def test_failed_pairing_id_paired_again(self):
        """A failed shared pairing (timed out: the relay may have stored it all the same) gives its freshly drawn id to
        the next pairing, which replaces it at the relay instead of adding a pair there."""
        failed = ensureDeferred(self.pool.acquire())
        self.pairings[0].errback(RelayError(504, "the relay did not answer"))
        self.failureResultOf(failed, RelayError)
        ensureDeferred(self.pool.acquire())
        self.assertIsInstance(self.asked_ids[0], str)
        self.assertEqual(self.asked_ids, [self.asked_ids[0]] * 2)

    def test_failure_reaches_every_waiting_caller(self):
        """A failed pairing fails every caller still waiting, and the next request pairs again."""
        callers = [ensureDeferred(self.pool.acquire()) for _ in range(3)]
        callers[1].cancel()
        self.pairings[0].errback(RelayError(565, "pairing failed"))
        for caller in (callers[0], callers[2]):
            self.assertEqual(self.failureResultOf(caller, RelayError).value.code, 565)
        self.failureResultOf(callers[1], CancelledError)
        ensureDeferred(self.pool.acquire())
        self.assertEqual(len(self.pairings), 2)


class _ScriptedAnswer:
    """A response to a scripted request: ``code``, ``headers`` and a body delivered at once."""

    phrase = b""

    def __init__(self, code, headers=(), body=b""):
        self.code, self.headers, self.body, self.length = code, Headers(dict(headers)), body, len(body)

    def deliverBody(self, protocol):
        protocol.makeConnection(SimpleNamespace(stopProducing=lambda: None))
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class _ScriptedAgent:
    """An IAgent whose requests wait in ``sent`` (method, path, headers, body producer, Deferred) for the test."""

    def __init__(self):
        self.sent = []

    def request(self, method, url, headers=None, producer=None):
        self.sent.append((method, url.split(b"/", 3)[-1], headers, producer, Deferred()))
        return self.sent[-1][-1]


class SharedOperationTests(SynchronousTestCase):
    def test_waiters_bounded(self):
        """Callers waiting on one shared discovery or pairing are bounded (each is an application request held in
        memory): past MAX_SHARED_WAITERS the next one is refused with 503 at once, and the first ones still get the
        outcome."""
        operation = Deferred()
        shared = _Shared(lambda: operation)
        waiting = [shared() for _ in range(MAX_SHARED_WAITERS)]
        self.assertEqual(self.assertRaises(RelayError, shared).code, 503)
        operation.callback("paired")
        self.assertEqual({self.successResultOf(w) for w in waiting}, {"paired"})


class ClientIdRaceTests(SynchronousTestCase):
    def test_pair_made_under_a_dropped_client_id_is_not_used(self):
        """
        A 566 for one request's pairing drops the client id while another request's pairing is on its way: that
        pair, made under the old id, is not used (it was sent with no client id at all, and failed with an
        AttributeError); the request starts over from a new discovery.
        """
        identity, agent = RelayIdentity.generate(), _ScriptedAgent()
        client = Client("http://relay.example", agent, Clock(), pool_size=1)
        first = client.request("GET", "/x", encode_type="MKE")
        agent.sent[0][-1].callback(_ScriptedAnswer(200, [(CLIENT_ID_HEADER, [TOKEN])]))
        second = client.request("GET", "/y", encode_type="MTE")
        self.assertEqual([sent[1] for sent in agent.sent], [b"api/mte-relay", b"api/mte-pair", b"api/mte-pair"])
        agent.sent[2][-1].callback(_ScriptedAnswer(566))
        # The refused request starts over from a new discovery.
        self.assertEqual(agent.sent[-1][:2], (b"HEAD", b"api/mte-relay"))
        producer, answer = agent.sent[1][3:]
        item = json.loads(producer._inputFile.getvalue())[0]
        client_id = TOKEN.split(b".")[0].decode()
        _, reply = relay_pair(identity, client_id, item["pairId"], "MKE", b64decode(item["publicKey"]))
        sealed = {"ciphertext": b64encode(reply.ciphertext), "signature": b64encode(reply.signature)}
        pairs = [{"pairId": item["pairId"], **sealed}]
        body = json.dumps({"identity": identity.public_b64(), "pairs": pairs}).encode()
        answer.callback(_ScriptedAnswer(200, body=body))
        # The first request waits for that discovery too, instead of being sent under the dropped id.
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual([sent[1] for sent in agent.sent[3:]], [b"api/mte-relay"])


class MTEPoolTests(SynchronousTestCase):
    """An MTE pool keeps its size through discards, timeouts and cancellations."""

    def setUp(self):
        self.clock = Clock()
        self.pairings, self.asked_ids = [], []
        self.pool = _Pool("MTE", 1, self._make_pair, self.clock, 5)

    def _make_pair(self, pair_id):
        self.asked_ids.append(pair_id)
        self.pairings.append(Deferred())
        return self.pairings[-1]

    def _paired(self):
        pair = SimpleNamespace(pair_id=self.asked_ids[-1])
        self.pairings[-1].callback(pair)
        return pair

    def test_waiters_paired_after_clear(self):
        """After ``clear`` (a new client id), a request already waiting for a pair gets one of the new generation at
        once, rather than waiting out its timeout while the old pair, when it returns, is dropped."""
        pair = self._paired_for(ensureDeferred(self.pool.acquire()))
        waiter = ensureDeferred(self.pool.acquire())
        self.pool.clear()
        self.pool.release(pair)
        self.assertEqual(len(self.pairings), 2)
        fresh = self._paired()
        self.assertIs(self.successResultOf(waiter), fresh)

    def test_discarded_pair_id_paired_again(self):
        """The pair replacing a discarded one is paired under its id (so it replaces it at the relay), a failed
        pairing gives the id back for the next try, and the id is drawn afresh after ``clear`` (a new client id)."""
        pair = self._paired_for(ensureDeferred(self.pool.acquire()))
        self.pool.discard(pair)
        replacing = ensureDeferred(self.pool.acquire())
        self.assertEqual(self.asked_ids, [pair.pair_id, pair.pair_id])
        self.pairings[-1].errback(RelayError(565, "pairing failed"))
        self.failureResultOf(replacing, RelayError)
        again = self._paired_for(ensureDeferred(self.pool.acquire()))
        self.assertEqual(again.pair_id, pair.pair_id)
        self.pool.discard(again)
        self.pool.clear()
        ensureDeferred(self.pool.acquire())
        self.assertNotIn(self.asked_ids[-1], self.asked_ids[:-1])

    def test_abandoned_first_pairing_id_paired_again(self):
        """A first pairing that is cancelled (its application went away) or fails gives its freshly drawn id to the
        next pairing: the relay may have stored it all the same, and only pairing that id again replaces it there."""
        cancelled = ensureDeferred(self.pool.acquire())
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        failed = ensureDeferred(self.pool.acquire())
        self.pairings[-1].errback(RelayError(504, "the relay did not answer"))
        self.failureResultOf(failed, RelayError)
        self._paired_for(ensureDeferred(self.pool.acquire()))
        self.assertIsInstance(self.asked_ids[0], str)
        self.assertEqual(self.asked_ids, [self.asked_ids[0]] * 3)

    def test_discard_idle_pairs_them_again(self):
        """``discard_idle`` (the relay lost its pairs) drops the pairs waiting in the pool; the next request pairs
        again under the dropped id instead of trying the stale pair."""
        pair = self._paired_for(ensureDeferred(self.pool.acquire()))
        self.pool.release(pair)
        self.pool.discard_idle()
        fresh = self._paired_for(ensureDeferred(self.pool.acquire()))
        self.assertIsNot(fresh, pair)
        self.assertEqual(fresh.pair_id, pair.pair_id)

    def _paired_for(self, acquiring):
        pair = self._paired()
        self.assertIs(self.successResultOf(acquiring), pair)
        return pair

    def test_replacement_outlives_the_waiter_it_was_for(self):
        """A pair made to replace a discarded one, for a waiter that timed out meanwhile, serves the next request."""
        first = ensureDeferred(self.pool.acquire())
        pair = self._paired()
        self.assertIs(self.successResultOf(first), pair)
        waiting = ensureDeferred(self.pool.acquire())
        self.pool.discard(pair)  # a replacement is being paired for the waiter
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(waiting, RelayError).value.code, 503)
        replacement = self._paired()
        self.assertIs(self.successResultOf(ensureDeferred(self.pool.acquire())), replacement)
        self.assertEqual(len(self.pairings), 2)

    def test_replacement_failure_after_the_waiter_left(self):
        """A replacement that fails after its waiter left frees the slot for a new pairing, and logs nothing."""
        first = ensureDeferred(self.pool.acquire())
        pair = self._paired()
        self.successResultOf(first)
        waiting = ensureDeferred(self.pool.acquire())
        self.pool.discard(pair)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.pairings[-1].errback(RelayError(565, "pairing failed"))
        gc.collect()  # a Deferred left failed would log its unhandled error now
        self.assertEqual(self.flushLoggedErrors(), [])
        later = ensureDeferred(self.pool.acquire())
        self.assertEqual(len(self.pairings), 3)
        replacement = self._paired()
        self.assertIs(self.successResultOf(later), replacement)

    def test_failed_replacement_leaves_no_waiter_stranded(self):
        """A replacement pairing that fails fails its own waiter; the next waiter gets a pairing of its own."""
        pair = self._paired_for(ensureDeferred(self.pool.acquire()))
        waiters = [ensureDeferred(self.pool.acquire()) for _ in range(2)]
        self.pool.discard(pair)
        self.pairings[-1].errback(RelayError(565, "pairing failed"))
        self.assertEqual(self.failureResultOf(waiters[0], RelayError).value.code, 565)
        self.assertEqual(len(self.pairings), 3)
        replacement = self._paired()
        self.assertIs(self.successResultOf(waiters[1]), replacement)


class RelayResponseTests(SynchronousTestCase):
    def test_repr_holds_no_opened_header(self):
        """Opened headers (cookies, credentials) stay out of a response's repr, which a log or traceback may show."""
        headers = Headers({b"set-cookie": [b"session=SECRET-abc"], b"authorization": [b"Bearer tok-secret"]})
        text = repr(RelayResponse(200, b"OK", headers, object()))
        self.assertIn("200", text)
        self.assertNotIn("SECRET", text)
        self.assertNotIn("tok-secret", text)


class KeygenTests(SynchronousTestCase):
    def test_writes_private_key_and_prints_public(self):
        """The key file is private (0600), loads as the identity whose public key was printed, and is not overwritten."""
        path = os.path.join(self.mktemp())
        printed = []

        class Out:
            write = printed.append

        keygen([path], out=Out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            self.assertEqual(RelayIdentity.from_pem(f.read()).public_b64() + "\n", printed[0])
        with self.assertRaises(SystemExit):
            keygen([path], out=Out)

    def test_help_is_whole_sentences(self):
        """``--help`` describes the command in its whole first paragraph, not a line cut off mid-sentence."""
        text = io.StringIO()
        with contextlib.redirect_stdout(text), self.assertRaises(SystemExit):
            keygen(["--help"])
        self.assertIn("for IDENTITY_KEY, and print its public key", " ".join(text.getvalue().split()))


class _RefusingRelay(Resource):
    """A relay that hands out client ids and refuses every pairing with ``code`` and a message of its own."""

    isLeaf = True

    def __init__(self, code):
        super().__init__()
        self.code, self.discoveries = code, 0

    def render(self, request):
        if request.method == b"HEAD":
            self.discoveries += 1
            request.setHeader(CLIENT_ID_HEADER, TOKEN)
            return b""
        request.setResponseCode(self.code)
        return json.dumps({"code": self.code, "message": "PEER TEXT <script>"}).encode()


class RefusedPairingTests(RelayHarness, TestCase):
    def test_refusal_text_not_passed_on_and_566_rediscovers(self):
        """A pairing refusal reaches the caller with the error table's message, never the relay's own text
        (unauthenticated); a 566 makes the client fetch a new client id before its retry, so that a client holding
        no pair recovers from a relay that rotated its secret."""

        async def run():
            for code, discoveries in ((567, 1), (566, 2)):
                relay = _RefusingRelay(code)
                url = f"http://127.0.0.1:{await serve(self, Site(relay))}"
                with self.assertRaises(RelayError) as ctx:
                    await self.client(url).request("GET", "/x")
                self.assertEqual(ctx.exception.code, code)
                self.assertNotIn("PEER", ctx.exception.detail)
                self.assertEqual(relay.discoveries, discoveries, code)

        return ensureDeferred(run())
