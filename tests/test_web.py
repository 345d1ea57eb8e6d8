"""Tests for the router (mterelay.web): dispatch order, echo, error table, CORS, outbound gate, draining."""

import json

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mterelay.config import Settings
from mterelay.errors import RelayError, error_table
from mterelay.web import (
    BODY_MIN_RATE,
    BODY_TIMEOUT,
    HEAD_TIMEOUT,
    MAX_PAIR_BODY,
    FLUSH_GRACE,
    DrainingService,
    InFlight,
    RelaySite,
    StopInOrder,
    StopSignals,
    build_resource,
    compile_routes,
    decoded_path,
)

SECRET = "s" * 40
#: The head of an encoded POST with a body (up to its framing header), for the stand-in inbound handler.
ENCODED_POST = (
    b"POST /v1/hi HTTP/1.1\r\nHost: a\r\nx-mte-relay: 1,AAECAwQFBgcICQoLDA0ODw,pair-0001-vector,MKE,0,0,1,1,0\r\n"
)


class Handler:
    """A stand-in MTE handler that records the paths it was given."""

    def __init__(self, name):
        self.name = name
        self.paths = []

    def render(self, request):
        self.paths.append(request.path)
        return self.name.encode()


def settings(**changes):
    return Settings(upstream="http://upstream.example", client_id_secrets=[SECRET], **changes)


def make_request(method, uri, headers=()):
    request = DummyRequest([])
    request.method = method
    request.uri = uri
    request.path = uri.split(b"?")[0]
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    return request


class RouterTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.inbound = Handler("inbound")
        self.outbound = Handler("outbound")

    def render(self, uri, method=b"GET", sent=(), handlers=True, **changes):
        """Render ``uri`` with a router for settings(**changes); returns (request, body)."""
        router = build_resource(
            settings(**changes),
            upstream=None,
            clock=self.clock,
            inbound=self.inbound if handlers else None,
            outbound=self.outbound if handlers else None,
        )
        request = make_request(method, uri, sent)
        body = router.render(request)
        return request, body


class EchoAndErrorsTests(RouterTestCase):
    def test_echo_message_and_time(self):
        """/api/mte-echo/<msg> echoes the decoded message and the clock's time in epoch milliseconds."""
        self.clock.advance(1234.5678)
        request, body = self.render(b"/api/mte-echo/hello%20you")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(body), {"echo": "hello you", "time": 1234567})
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])

    def test_echo_without_message(self):
        """/api/mte-echo answers echo: true."""
        _, body = self.render(b"/api/mte-echo")
        self.assertIs(json.loads(body)["echo"], True)

    def test_error_table(self):
        """/api/mte-errors serves the relay error table from mterelay.errors."""
        _, body = self.render(b"/api/mte-errors")
        self.assertEqual(json.loads(body), error_table())

    def test_headers_added(self):
        """HEADERS are set on every answer, echo included."""
        request, _ = self.render(b"/api/mte-echo", headers=(("x-service-name", "mte-relay"),))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-service-name"), [b"mte-relay"])

    def test_request_id_under_debug(self):
        """DEBUG adds an x-request-id: the caller's when it is a safe token, else a random one."""
        request, _ = self.render(b"/api/mte-echo", sent=[(b"x-request-id", b"abc-123")], debug=True)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-request-id"), [b"abc-123"])
        request, _ = self.render(b"/api/mte-echo", sent=[(b"x-request-id", b"bad\x01id")], debug=True)
        [generated] = request.responseHeaders.getRawHeaders(b"x-request-id")
        self.assertRegex(generated, rb"^[0-9a-f]{16}$")
        request, _ = self.render(b"/api/mte-echo")
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"x-request-id"))


class DispatchTests(RouterTestCase):
    def test_mte_paths_go_inbound(self):
        """/api/mte-relay, /api/mte-pair and, with MTE_ROUTES unset, any other path reach the inbound handler."""
        for path in (b"/api/mte-relay", b"/api/mte-pair", b"/anything/else"):
            _, body = self.render(path, method=b"POST")
            self.assertEqual(body, b"inbound")
        self.assertEqual(self.inbound.paths, [b"/api/mte-relay", b"/api/mte-pair", b"/anything/else"])

    def test_mte_routes_restrict(self):
        """With MTE_ROUTES set, listed patterns go inbound and other paths answer 404 JSON."""
        _, body = self.render(b"/api/v1/users/7", mte_routes=("/api/v1/*",))
        self.assertEqual(body, b"inbound")
        request, body = self.render(b"/other", mte_routes=("/api/v1/*",))
        self.assertEqual(request.responseCode, 404)
        self.assertEqual(json.loads(body)["error"], "not-found")

    def test_absent_handlers_answer_501(self):
        """Without an inbound handler, MTE routes answer 501 with the JSON error body."""
        request, body = self.render(b"/api/mte-pair", method=b"POST", handlers=False)
        self.assertEqual(request.responseCode, 501)
        self.assertEqual(json.loads(body)["code"], 501)

    def test_outbound_token_gate(self):
        """x-mte-outbound-token reaches the outbound handler only when it matches OUTBOUND_TOKEN."""
        header = [(b"x-mte-outbound-token", b"right-token")]
        request, body = self.render(b"/x", sent=header)
        self.assertEqual((request.responseCode, json.loads(body)["code"]), (401, 401))
        request, body = self.render(b"/x", sent=[(b"x-mte-outbound-token", b"wrong")], outbound_token="right-token")
        self.assertEqual(request.responseCode, 401)
        _, body = self.render(b"/x", sent=header, outbound_token="right-token")
        self.assertEqual(body, b"outbound")

    def test_outbound_token_missing_or_given_twice(self):
        """A request naming a peer relay without the token is refused 401 (not taken for an inbound one), and so is
        one carrying the token twice, whichever of the two is right."""
        peer = (b"x-mte-upstream", b"http://peer.example")
        for sent in (
            [peer],
            [(b"x-mte-outbound-token", b"wrong"), (b"x-mte-outbound-token", b"right-token")],
            [(b"x-mte-outbound-token", b"right-token"), (b"x-mte-outbound-token", b"wrong")],
        ):
            request, body = self.render(b"/x", sent=sent, outbound_token="right-token")
            self.assertEqual((request.responseCode, json.loads(body)["code"]), (401, 401), sent)

    def test_dot_segments_refused(self):
        """Encoded dot segments are refused so that no route pattern can be escaped at the upstream."""
        request, body = self.render(b"/public/%2e%2e/secret", pass_through_routes=("/public/*",))
        self.assertEqual(request.responseCode, 400)
        self.assertEqual(json.loads(body)["error"], "bad-request")

    def test_decoded_path(self):
        """decoded_path decodes percent escapes and refuses dot segments, plain or encoded, slash-led or not, with a
        ``;`` parameter (``..;``, a servlet container's ``..``) or not, and backslashes (another server's ``/``)."""
        self.assertEqual(decoded_path(b"/a/b%20c"), "/a/b c")
        self.assertEqual(decoded_path(b"/a/.b/c"), "/a/.b/c")
        self.assertEqual(decoded_path(b"/a/b;v=1/..c"), "/a/b;v=1/..c")
        for raw in (
            b"/a/../b", b"/a/./b", b"/a/%2E%2e/b", b"..", b"./x", b"/a/..",
            b"/public/..;/admin", b"/public/.;x/admin", b"/public/%2e%2e;/admin", b"/public\\..\\admin",
            b"/public/%5c../admin", b"/a\\b",
        ):
            with self.assertRaises(RelayError):
                decoded_path(raw)

    def test_absolute_target_refused(self):
        """A proxy-style absolute request target is a bad request, not forwarded."""
        request, _ = self.render(b"http://elsewhere/x")
        self.assertEqual(request.responseCode, 400)


class CorsTests(RouterTestCase):
    ORIGIN = b"https://app.example"

    def test_preflight_allowed_origin(self):
        """A preflight from an allowed origin gets the origin, methods, credentials and the MTE headers."""
        request, body = self.render(
            b"/api/v1/x",
            method=b"OPTIONS",
            sent=[(b"origin", self.ORIGIN), (b"access-control-request-method", b"POST")],
            cors_origins=("https://app.example",),
            cors_methods=("GET", "POST"),
        )
        self.assertEqual((request.responseCode, body), (204, b""))
        get = lambda name: request.responseHeaders.getRawHeaders(name, [b""])[0]  # noqa: E731
        self.assertEqual(get(b"access-control-allow-origin"), self.ORIGIN)
        self.assertEqual(get(b"access-control-allow-credentials"), b"true")
        self.assertEqual(get(b"access-control-allow-methods"), b"GET, POST, OPTIONS, HEAD")
        for name in (b"x-mte-relay", b"x-mte-relay-eh", b"x-mte-client-id", b"content-type"):
            self.assertIn(name, get(b"access-control-allow-headers"))
            if name != b"content-type":
                self.assertIn(name, get(b"access-control-expose-headers"))
        self.assertEqual(self.inbound.paths, [])

    def test_other_origin_gets_no_grant(self):
        """A preflight or request from an origin not listed gets no access-control-allow-* header."""
        for method, extra in ((b"OPTIONS", [(b"access-control-request-method", b"POST")]), (b"GET", [])):
            request, _ = self.render(
                b"/api/mte-echo", method=method, sent=[(b"origin", b"https://evil.example")] + extra,
                cors_origins=("https://app.example",),
            )
            names = [name.lower() for name, _ in request.responseHeaders.getAllRawHeaders()]
            self.assertFalse([n for n in names if n.startswith(b"access-control-allow")])

    def test_vary_origin_whenever_origins_are_granted(self):
        """With CORS_ORIGINS set every answer (to another origin, or to none) says Vary: Origin, so that a cache never
        hands an answer without the grant to an allowed origin; without CORS_ORIGINS none does."""
        for sent in ([(b"origin", b"https://evil.example")], []):
            request, _ = self.render(b"/api/mte-echo", sent=sent, cors_origins=("https://app.example",))
            self.assertEqual(request.responseHeaders.getRawHeaders(b"vary"), [b"Origin"], sent)
        request, _ = self.render(b"/api/mte-echo", sent=[(b"origin", b"https://evil.example")])
        self.assertFalse(request.responseHeaders.hasHeader(b"vary"))

    def test_simple_request_from_allowed_origin(self):
        """A normal request from an allowed origin is answered with the grant and Vary: Origin."""
        request, _ = self.render(b"/api/mte-echo", sent=[(b"origin", self.ORIGIN)], cors_origins=("https://app.example",))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"access-control-allow-origin"), [self.ORIGIN])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"vary"), [b"Origin"])


class RoutePatternTests(SynchronousTestCase):
    def test_wildcards(self):
        """'*' matches any run of characters; other characters match literally."""
        routes = compile_routes(("/health", "/api/v1/*", "/a.b"))
        self.assertTrue(routes.fullmatch("/health"))
        self.assertTrue(routes.fullmatch("/api/v1/x/y"))
        self.assertFalse(routes.fullmatch("/healthz"))
        self.assertFalse(routes.fullmatch("/aXb"))
        self.assertIsNone(compile_routes(()))


class InFlightTests(SynchronousTestCase):
    def test_wait_for_requests(self):
        """wait() fires True once tracked requests finish, or False when the timeout passes first."""
        clock = Clock()
        tracker = InFlight(clock)
        self.assertTrue(self.successResultOf(tracker.wait(5)))
        first, second = make_request(b"GET", b"/"), make_request(b"GET", b"/")
        tracker.track(first)
        tracker.track(second)
        waiting = tracker.wait(5)
        first.finish()
        self.assertNoResult(waiting)
        second.finish()
        self.assertTrue(self.successResultOf(waiting))
        third = make_request(b"GET", b"/")
        tracker.track(third)
        waiting = tracker.wait(5)
        clock.advance(5)
        self.assertFalse(self.successResultOf(waiting))
        self.assertEqual(len(tracker), 1)

    def test_render_tracks(self):
        """The router counts a request in flight until it finishes."""
        tracker = InFlight(Clock())
        router = build_resource(settings(), None, Clock(), inbound=_Pending(), tracker=tracker)
        request = make_request(b"POST", b"/api/mte-relay")
        self.assertEqual(router.render(request), NOT_DONE_YET)
        self.assertEqual(len(tracker), 1)
        request.finish()
        self.assertEqual(len(tracker), 0)


class _Pending:
    def render(self, request):
        return NOT_DONE_YET


class DrainingServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.closed = []
        tracker = InFlight(self.clock)
        self.site = RelaySite(build_resource(settings(), None, self.clock), settings(), self.clock)
        self.service = DrainingService(tracker, 10, lambda: self.closed.append(True), self.site)
        self.service.startService()
        self.request = make_request(b"GET", b"/")
        tracker.track(self.request)

    def test_stop_waits_for_requests_then_closes(self):
        """Stopping drains the site's open connections, waits for in-flight requests, then runs the close hook."""
        stopping = self.service.stopService()
        self.assertTrue(self.site.draining)
        self.assertNoResult(stopping)
        self.clock.advance(9)
        self.assertEqual(self.closed, [])
        self.request.finish()
        self.successResultOf(stopping)
        self.assertEqual(self.closed, [True])

    def test_stop_in_order_waits_for_the_drain(self):
        """Under StopInOrder, a service added before the relay (the registry) stops only after the drain."""
        stopped = []
        registry = Service()
        registry.stopService = lambda: stopped.append("registry")
        lifetime = StopInOrder()
        registry.setServiceParent(lifetime)
        self.service.setServiceParent(lifetime)
        stopping = lifetime.stopService()
        self.clock.advance(5)
        self.assertEqual((stopped, self.closed), ([], []))
        self.request.finish()
        self.successResultOf(stopping)
        self.assertEqual((stopped, self.closed), (["registry"], [True]))

    def test_stop_in_order_goes_on_after_a_failure(self):
        """A child that fails to stop is logged and the ones before it still stop."""
        stopped = []
        first, second = Service(), Service()
        first.stopService = lambda: stopped.append("first")
        second.stopService = lambda: 1 / 0
        lifetime = StopInOrder()
        first.setServiceParent(lifetime)
        second.setServiceParent(lifetime)
        self.successResultOf(lifetime.stopService())
        self.assertEqual(stopped, ["first"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def _stop_with_open_connection(self, answered_after=0, clock_back=0):
        """
        Stop with one idle kept-alive connection open, the one request answered ``answered_after`` seconds into the
        drain, just after the clock was set back by ``clock_back`` seconds: (channel, stopping).
        """
        channel, transport = connect_channel(self.site, self.clock)
        stopping = self.service.stopService()
        self.clock.advance(answered_after)
        self.clock.rightNow -= clock_back
        self.request.finish()
        self.assertTrue(transport.disconnecting)
        return channel, stopping

    def test_stop_waits_for_connections_to_close(self):
        """Once every request is answered, stopping still waits for the drained connections to close, having sent
        their last bytes (a stopping reactor drops what is still buffered)."""
        channel, stopping = self._stop_with_open_connection()
        self.assertNoResult(stopping)
        channel.connectionLost(None)
        self.successResultOf(stopping)
        self.assertEqual(self.closed, [True])

    def assert_stops_after(self, answered_after, seconds, clock_back=0):
        """With a connection that never closes, stopping ends ``seconds`` after the answer (``answered_after``)."""
        _, stopping = self._stop_with_open_connection(answered_after, clock_back)
        self.clock.advance(seconds - 0.01)
        self.assertNoResult(stopping)
        self.clock.advance(0.01)
        self.successResultOf(stopping)
        self.assertEqual(self.closed, [True])

    def test_wait_for_connections_bounded_by_drain_timeout(self):
        """A connection that does not close (a client reading nothing) delays stopping to DRAIN_TIMEOUT after the
        drain began, not beyond."""
        self.assert_stops_after(5, 5)

    def test_clock_set_back_does_not_stretch_the_drain(self):
        """A wall clock set back during the drain gives the connections DRAIN_TIMEOUT at most, not the hour it went
        back (systemd would kill the relay first)."""
        self.assert_stops_after(2, 10, clock_back=3600)

    def test_last_answer_has_flush_grace(self):
        """An answer finished just before DRAIN_TIMEOUT still has FLUSH_GRACE to go out, and no more."""
        self.assert_stops_after(9.5, FLUSH_GRACE)

    def test_stop_bounded_by_drain_timeout(self):
        """A request that never finishes delays stopping by DRAIN_TIMEOUT only."""
        stopping = self.service.stopService()
        self.clock.advance(10)
        self.successResultOf(stopping)
        self.assertEqual(self.closed, [True])

    def test_answer_unfinished_at_drain_timeout_is_aborted(self):
        """A connection whose answer is still under way when DRAIN_TIMEOUT runs out (a stream) is aborted, so that
        its client sees a reset, never an end (a FIN would end an HTTP/1.0 body without length)."""
        channel, transport = connect_channel(self.site, self.clock)
        # A request still in hand at the deadline (its body half sent), as a stream's answer would be.
        channel.dataReceived(b"POST /api/mte-pair HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n0123456789")
        stopping = self.service.stopService()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.successResultOf(stopping)

    def test_hurry_breaks_the_drain_off(self):
        """``hurry`` (a second Ctrl-C) ends the drain at once: the connection with an answer still under way is
        aborted (its client sees a reset, never an end) and the close hook runs, long before DRAIN_TIMEOUT."""
        channel, transport = connect_channel(self.site, self.clock)
        channel.dataReceived(b"POST /api/mte-pair HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n0123456789")
        stopping = self.service.stopService()
        self.clock.advance(1)
        self.service.hurry()
        self.clock.advance(0)
        self.assertTrue(transport.disconnected)
        self.successResultOf(stopping)
        self.assertEqual(self.closed, [True])
        # The drain's own timers are gone (what is left are the aborted channel's, which a StringTransport keeps).
        self.assertEqual([c for c in self.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is not channel],
                         [])

    def test_hurry_while_connections_flush(self):
        """Once every request is answered, ``hurry`` also cuts short the wait for connections to send their last
        bytes."""
        channel, stopping = self._stop_with_open_connection()
        self.service.hurry()
        self.clock.advance(0)
        self.assertTrue(channel.transport.disconnected)
        self.successResultOf(stopping)

    def test_hurry_outside_a_drain_does_nothing(self):
        """``hurry`` before the drain, or after it completed, changes nothing and raises nothing."""
        self.service.hurry()
        stopping = self.service.stopService()
        self.request.finish()
        self.successResultOf(stopping)
        self.service.hurry()
        self.assertEqual(self.closed, [True])

    def test_stop_signals_watched_from_the_start(self):
        """Starting the service has ``StopSignals`` watch for stop signals, wired to ``hurry``; stopping it for any
        reason marks them as stopping, so that a later signal never goes to the stopping reactor's own handler."""
        reactor = _SignalReactor()
        signals = _Signals({15: reactor.sigTerm, 2: reactor.sigInt})
        stop_signals = StopSignals(reactor, signals)
        service = DrainingService(self.service._tracker, 10, None, self.site, stop_signals)
        service.startService()
        self.assertFalse(stop_signals.stopping)
        service.stopService()
        self.assertTrue(stop_signals.stopping)
        signals.handlers[2](2, None)
        self.assertEqual(reactor.received, [])
        self.assertEqual(reactor.handed, [service.hurry])


class _Signals:
    """The part of the ``signal`` module ``StopSignals`` uses, over a table of handlers."""

    SIGTERM, SIGINT = 15, 2

    def __init__(self, handlers):
        self.handlers = handlers

    def getsignal(self, number):
        return self.handlers[number]

    def signal(self, number, handler):
        self.handlers[number] = handler


class _SignalReactor:
    """A running reactor's own signal handlers (recording the signals they got), and ``callFromThread`` recording
    what it was handed before running it."""

    def __init__(self):
        self.received = []
        self.handed = []

    def sigTerm(self, number, frame):
        self.received.append(number)

    def sigInt(self, number, frame):
        self.received.append(number)

    def callWhenRunning(self, f, *args):
        f(*args)

    def callFromThread(self, f, *args):
        self.handed.append(f)
        f(*args)


class StopSignalsTests(SynchronousTestCase):
    def watched(self, handlers=None):
        """A watching ``StopSignals`` over the reactor's own handlers (or ``handlers``): (reactor, signals,
        hurried, logged)."""
        reactor = _SignalReactor()
        signals = _Signals(handlers or {15: reactor.sigTerm, 2: reactor.sigInt})
        hurried, logged = [], []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        StopSignals(reactor, signals).watch(lambda: hurried.append(True), lambda: 3)
        return reactor, signals, hurried, logged

    def test_first_signal_goes_to_the_reactor(self):
        """The first SIGTERM or SIGINT still stops the reactor through its own handler (which logs it and makes
        twistd exit with that signal)."""
        for number in (15, 2):
            reactor, signals, hurried, _ = self.watched()
            signals.handlers[number](number, None)
            self.assertEqual((reactor.received, hurried), ([number], []))

    def test_later_sigterm_is_logged(self):
        """A SIGTERM while stopping only logs how many requests are in flight, through the reactor (a signal handler
        must not run reactor code itself), and never reaches the stopping reactor's handler."""
        reactor, signals, hurried, logged = self.watched()
        signals.handlers[15](15, None)
        signals.handlers[15](15, None)
        self.assertEqual((reactor.received, hurried), ([15], []))
        self.assertEqual(len(reactor.handed), 1)
        self.assertEqual([e["count"] for e in logged if "count" in e], [3])

    def test_later_sigint_hurries(self):
        """A SIGINT while stopping (a second Ctrl-C, or one after a SIGTERM) breaks the drain off."""
        reactor, signals, hurried, _ = self.watched()
        signals.handlers[15](15, None)
        signals.handlers[2](2, None)
        self.assertEqual((reactor.received, hurried), ([15], [True]))

    def test_foreign_handlers_left_alone(self):
        """A handler the reactor did not install (SIGINT ignored under a shell, a debugger's) stays in place."""
        debugger = object()
        _, signals, _, _ = self.watched({15: debugger, 2: "SIG_IGN"})
        self.assertEqual(signals.handlers, {15: debugger, 2: "SIG_IGN"})


class SiteDrainTests(SynchronousTestCase):
    """Draining the site: no connection takes a new request, none is cut off in the middle of one."""

    def test_idle_connection_closed_at_once(self):
        """A kept-alive connection with no request in hand is closed when the drain starts: a balancer's next
        request on it would otherwise be taken and then cut off unanswered when the drain ends."""
        _, channel, transport = channel_on_clock()
        channel.dataReceived(b"GET /api/mte-echo/a HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertFalse(transport.disconnecting)
        channel.site.drain()
        self.assertTrue(transport.disconnecting)

    def test_request_in_hand_answered_with_connection_close(self):
        """A request still arriving when the drain starts is answered, saying ``Connection: close``, and then the
        connection closes; a closed connection leaves the site's table."""
        _, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 20\r\n\r\n0123456789")
        channel.site.drain()
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"0123456789")
        head = transport.value().partition(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.assertEqual(channel.site.channels, set())


def channel_on_clock(**changes):
    """A relay channel on a ``StringTransport`` whose timers run on a ``Clock``: (clock, channel, transport)."""
    clock = Clock()
    # Requests with x-mte-relay go to a stand-in inbound handler that answers at once, once their body is in.
    resource = build_resource(settings(**changes), None, clock, inbound=Handler("inbound"))
    site = RelaySite(resource, settings(**changes), clock)
    return (clock, *connect_channel(site, clock))


def connect_channel(site, clock):
    """A connection to ``site`` on a ``StringTransport``, its timers on ``clock``: (channel, transport)."""
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def assert_408(case, transport):
    """``transport`` carries the relay's JSON 408 and nothing else, and is closing."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    case.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
    case.assertEqual(json.loads(body)["code"], 408)
    case.assertTrue(transport.disconnecting)


class EarlyRefusalTests(SynchronousTestCase):
    """A body nothing will read, or more than its route takes, is refused on the request's head, unread."""

    def assert_refused(self, head, code, **changes):
        _, channel, transport = channel_on_clock(**changes)
        channel.dataReceived(head)
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % code), answer)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["code"], code)
        self.assertTrue(transport.disconnecting)
        return channel, transport

    def test_refusal_on_the_head_carries_the_relays_headers_and_is_logged(self):
        """A refusal made on the head carries what every other answer of the relay does (CORS for a granted origin,
        Vary: Origin, HEADERS), so a browser can read it, and is logged like any other answer."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        head = (b"POST /api/mte-echo/x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\n"
                b"Content-Length: 100000000\r\n\r\n")
        _, transport = self.assert_refused(head, 413, cors_origins=("https://app.example",),
                                           headers=(("x-service-name", "relay"),))
        answer = transport.value().partition(b"\r\n\r\n")[0].lower()
        for line in (b"access-control-allow-origin: https://app.example", b"vary: origin", b"x-service-name: relay"):
            self.assertIn(b"\r\n" + line + b"\r\n", answer + b"\r\n")
        logged = [formatEvent(e) for e in events if e.get("code") == 413]
        self.assertEqual(len(logged), 1)
        self.assertTrue(logged[0].startswith("POST /api/mte-echo/x 413 "), logged)

    def test_large_pair_request_refused_on_its_head(self):
        """A pair request announcing more than MAX_PAIR_BODY bytes is answered 413 before any of it is read, and a
        chunked one once its chunks pass the bound (not at MAX_BODY_SIZE, 1 GiB by default)."""
        head = b"POST /api/mte-pair HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
        self.assert_refused(head % (MAX_PAIR_BODY + 1), 413)
        _, channel, transport = channel_on_clock()
        channel.dataReceived(b"POST /api/mte-pair HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (32768, b"[" * 32768)
        channel.dataReceived(chunk * 2)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"1\r\n[\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())

    def test_body_nothing_reads_refused_on_its_head(self):
        """
        A body nothing would read is refused as soon as the head is in: for the inbound role without x-mte-relay
        or with a malformed one (569, also under /api/mte-pair/), outside MTE_ROUTES (404, an encoded message's
        visible path too), for the relay's own routes and CORS preflights (413), for the outbound role without its
        token (401). The same heads with what they lacked are let through.
        """
        head = b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n%s\r\n"
        token = b"x-mte-outbound-token: " + b"t" * 32 + b"\r\nx-mte-upstream: http://b\r\n"
        outbound = {"outbound_token": "t" * 32}
        for path, extra, code, changes in (
            (b"/v1/x", b"", 569, {}),
            (b"/api/mte-pair/x", b"", 569, {}),
            (b"/v1/x", b"", 404, {"mte_routes": ("/v2/*",)}),
            (b"/api/mte-echo/x", b"", 413, {}),
            (b"/api/mte-errors", b"", 413, {}),
            (b"/api/mte-relay", b"", 413, {}),
            (b"/v1/x", token.replace(b"t" * 32, b"u" * 32), 401, outbound),
            (b"/v1/x", token, 401, {}),
            (b"/v1/x", b"x-mte-relay: junk\r\n", 569, {}),
            (b"/v1/x", ENCODED_POST.split(b"\r\n")[2] + b"\r\n", 404, {"mte_routes": ("/v2/*",)}),
            (b"/v1/x", b"access-control-request-method: POST\r\n", 413, {"pass_through_routes": ("/v1/*",)}),
        ):
            self.assert_refused(head % (path, extra), code, **changes)
        for path, extra, changes in (
            (b"/v1/x", b"x-mte-relay: 1,AAECAwQFBgcICQoLDA0ODw,pair-0001-vector,MKE,0,0,1,1,0\r\n", {}),
            (b"/v1/x", b"", {"pass_through_routes": ("/v1/*",)}),
            (b"/v1/x", token, outbound),
        ):
            _, channel, transport = channel_on_clock(**changes)
            channel.dataReceived(head % (path, extra))
            self.assertEqual(transport.value(), b"")
            self.assertFalse(transport.disconnecting)


class _LookingUp(Handler):
    """A stand-in inbound handler whose pair lookup waits on ``gate``, through a Deferred that has been called already
    (as txredisapi's are): only a callback can tell that its result is not there yet."""

    def __init__(self):
        super().__init__("inbound")
        self.gate = Deferred()

    def pair_lookup(self, header):
        return succeed(None).addCallback(lambda _: self.gate)


class PairLookupTests(SynchronousTestCase):
    """An encoded message with a body: its pair is looked up on the head, and nothing is read until it is known."""

    def channel(self):
        clock = Clock()
        handler = _LookingUp()
        site = RelaySite(build_resource(settings(), None, clock, inbound=handler), settings(), clock)
        channel, transport = connect_channel(site, clock)
        return handler, channel, transport

    def test_reading_stops_until_the_pair_is_known(self):
        """The connection stops reading as soon as the head is in, and reads again once the pair is known; the body
        then goes to the handler."""
        handler, channel, transport = self.channel()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 4\r\n\r\n")
        self.assertEqual(transport.producerState, "paused")
        handler.gate.callback("record")
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"body")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())

    def test_unknown_pair_refused_without_100_continue(self):
        """A client that asked to be told before sending its body (Expect: 100-continue) is not told to send it
        while the pair is looked up; an unknown pair is refused with 560 and no 100 ever; a known one gets its 100
        once known."""
        handler, channel, transport = self.channel()
        channel.dataReceived(ENCODED_POST + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        handler.gate.errback(RelayError(560))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 560 "), transport.value())
        self.assertNotIn(b"100 Continue", transport.value())
        handler, channel, transport = self.channel()
        channel.dataReceived(ENCODED_POST + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        handler.gate.callback("record")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_client_gone_before_the_answer(self):
        """A client that goes away while its pair is looked up leaves nothing to answer and no error behind."""
        handler, channel, transport = self.channel()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 4\r\n\r\n")
        [request] = channel.requests
        channel.connectionLost(None)
        handler.gate.errback(RelayError(560))
        self.assertEqual(transport.value(), b"")
        # The lookup ends with the refusal (for nobody), not with an error of its own left to be logged.
        self.assertEqual(request.pair_lookup.result.code, 560)


class HeadTimeoutTests(SynchronousTestCase):
    """A request's head must arrive whole within HEAD_TIMEOUT of its first byte, however it trickles in."""

    def test_trickled_head_answered_408(self):
        """A client sending one header line at a time (each within the idle timeout) gets a JSON 408 and a close
        once HEAD_TIMEOUT has passed since the head's first byte."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(b"GET /api/mte-echo HTTP/1.1\r\nHost: a\r\n")
        for _ in range(HEAD_TIMEOUT - 1):
            clock.advance(1)
            channel.dataReceived(b"x-h: a\r\n")
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        assert_408(self, transport)

    def test_head_in_time_not_timed_out(self):
        """A head that arrives within HEAD_TIMEOUT, slowly, is answered, and leaves no head timer behind for the
        next request on the connection."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(b"GET /api/mte-echo/hi HTTP/1.1\r\n")
        clock.advance(HEAD_TIMEOUT - 1)
        channel.dataReceived(b"Host: a\r\n\r\n")
        self.assertIn(b'"echo":"hi"', transport.value())
        clock.advance(HEAD_TIMEOUT)
        self.assertFalse(transport.disconnecting)
        self.assertNotIn(b"408", transport.value())


class BodyTimeoutTests(SynchronousTestCase):
    """A request body must keep coming at BODY_MIN_RATE bytes a second or faster, or the client gets a JSON 408."""

    def test_stalled_body_answered_408(self):
        """A body that stops arriving is answered 408 (and closed) after BODY_TIMEOUT, not dropped silently after
        the idle timeout."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 100\r\n\r\n0123456789")
        clock.advance(BODY_TIMEOUT - 1)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        assert_408(self, transport)

    def test_trickled_body_answered_408(self):
        """A chunked body trickling in below the minimum rate (each piece well within the idle timeout) runs out of
        time within a few periods."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Transfer-Encoding: chunked\r\n\r\n")
        for second in range(3 * BODY_TIMEOUT):
            if transport.disconnecting:
                break
            channel.dataReceived(b"a\r\n0123456789\r\n")
            clock.advance(1)
        self.assertLess(second, 2 * BODY_TIMEOUT)
        assert_408(self, transport)

    def test_burst_buys_no_more_than_one_period(self):
        """A burst of body bytes followed by silence buys at most one more BODY_TIMEOUT, however large the burst."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 300000\r\n\r\n")
        channel.dataReceived(b"x" * 200000)
        clock.advance(BODY_TIMEOUT)
        clock.advance(BODY_TIMEOUT)
        assert_408(self, transport)

    def test_body_at_minimum_rate_answered(self):
        """A long body arriving at the minimum rate is read to its end and answered, and leaves no timer behind
        for the next request on the connection."""
        clock, channel, transport = channel_on_clock()
        seconds = 3 * BODY_TIMEOUT
        channel.dataReceived(
            ENCODED_POST + b"Content-Length: %d\r\n\r\n" % (seconds * BODY_MIN_RATE)
        )
        for _ in range(seconds):
            clock.advance(1)
            channel.dataReceived(b"x" * BODY_MIN_RATE)
        self.assertIn(b"inbound", transport.value())
        clock.advance(2 * BODY_TIMEOUT)  # still within the idle timeout of a kept-alive connection
        self.assertFalse(transport.disconnecting)
        self.assertNotIn(b"408", transport.value())

    def test_nothing_processed_after_408(self):
        """Body bytes that still arrive after the 408 (a TLS connection delivers them until the client acknowledges
        the close) complete nothing: the request is never processed and nothing more is written."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 20\r\n\r\n0123456789")
        clock.advance(BODY_TIMEOUT)
        assert_408(self, transport)
        answered = transport.value()
        channel.dataReceived(b"0123456789GET /api/mte-echo/again HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.value(), answered)

    def test_half_close_mid_body_not_timed(self):
        """A client that half-closes mid-body loses its request with the connection; no 408 follows while the
        connection drains."""
        clock, channel, transport = channel_on_clock()
        channel.dataReceived(ENCODED_POST + b"Content-Length: 20\r\n\r\n0123456789")
        channel.readConnectionLost()
        clock.advance(BODY_TIMEOUT)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_refused_body_answered_once(self):
        """A request refused on its head (413) gets that answer only: no 408 follows while its body never comes."""
        clock, channel, transport = channel_on_clock(max_body_size=10)
        channel.dataReceived(ENCODED_POST + b"Content-Length: 100\r\n\r\n")
        clock.advance(2 * BODY_TIMEOUT)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
