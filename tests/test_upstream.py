"""Unit tests for mterelay.upstream: header filtering, the request body producer and response streaming."""

import io
import os

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestTransmissionFailed, ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from mterelay.codec.keys import RECORD_SIZE, TAG_SIZE, MessageKeys
from mterelay.errors import RelayError
from mterelay.web import CLIENT_IDLE_TIMEOUT
from mterelay.upstream import (
    AgentUpstreamClient,
    IdleDeadline,
    IUpstreamClient,
    READ_SIZE,
    RequestBodyProducer,
    copy_response_head,
    filter_headers,
    make_pool,
    merge_end_to_end,
    stream_response,
    upstream_error,
    upstream_headers,
)


def message_keys():
    """One direction's keys of a message under a random key (the body codec needs no pair for this)."""
    key = os.urandom(32)
    return MessageKeys(key, None, 0, 1, bytes(20))


class ReadLog(io.BytesIO):
    """A body file that notes the size of every piece read from it."""

    def __init__(self, data):
        super().__init__(data)
        self.sizes = []

    def read(self, size=-1):
        data = super().read(size)
        self.sizes.append(len(data))
        return data


class Upper:
    """A body transform that upper-cases, knows its output length, and can be told to fail."""

    def __init__(self, fail_on=None, sized=True):
        self.fail_on = fail_on
        self.finished = False
        if sized:
            self.output_length = lambda n: n + 3

    def feed(self, data):
        if self.fail_on is not None and self.fail_on in data:
            raise RelayError(562, "bad record")
        return [data.upper()]

    def finish(self):
        self.finished = True
        return [b"END"]


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_mte_headers_dropped(self):
        """Connection, the names it lists, the other hop-by-hop headers, Proxy-* and x-mte-* are not forwarded."""
        headers = Headers(
            {
                b"Connection": [b"close, X-Listed"],
                b"X-Listed": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"TE": [b"trailers"],
                b"Trailer": [b"x"],
                b"Transfer-Encoding": [b"chunked"],
                b"Upgrade": [b"h2c"],
                b"Proxy-Authorization": [b"Basic x"],
                b"X-Mte-Relay": [b"abc"],
                b"Set-Cookie": [b"a=1", b"b=2"],
                b"Content-Type": [b"text/plain"],
                b"Host": [b"client.example"],
            }
        )
        kept = filter_headers(headers, drop=(b"host",))
        self.assertEqual(
            sorted(name.lower() for name, _ in kept.getAllRawHeaders()), [b"content-type", b"set-cookie"]
        )
        self.assertEqual(kept.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])

    def test_opened_block_overlays_and_is_filtered(self):
        """
        An opened header block replaces the visible headers of its names; its framing, hop-by-hop, Proxy-* and
        x-mte-* headers never go upstream, nor any header, visible or sealed, that its own Connection lists; hidden
        names are dropped.
        """
        request = DummyRequest([b""])
        request.isSecure = lambda: False
        visible = (
            (b"Accept", b"visible"),
            (b"Content-Type", b"application/octet-stream"),
            (b"X-A", b"v"),
            (b"X-Hop", b"h"),
        )
        for name, value in visible:
            request.requestHeaders.addRawHeader(name, value)
        opened = [
            (b"Accept", b"sealed"),
            (b"Content-Length", b"999"),
            (b"Host", b"evil.example"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"X-Secret, X-Hop"),
            (b"X-Secret", b"1"),
            (b"Proxy-Authorization", b"x"),
            (b"X-Mte-Relay", b"x"),
            (b"Content-Type", b"text/plain"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
        headers = upstream_headers(request, [("X-Extra", "e")], opened, hidden=(b"content-type",))
        self.assertEqual(headers.getRawHeaders(b"accept"), [b"sealed"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"v"])
        self.assertEqual(headers.getRawHeaders(b"x-extra"), [b"e"])
        dropped = (b"content-length", b"host", b"transfer-encoding", b"connection", b"x-mte-relay", b"proxy-authorization")
        for name in dropped + (b"x-secret", b"x-hop"):
            self.assertFalse(headers.hasHeader(name), name)

    def test_visible_connection_names_no_sealed_header(self):
        """A visible Connection header (anyone's on the way) drops only visible headers it names, never sealed ones;
        with ``allowed`` only the visible headers named there (and X-Forwarded-For) pass."""
        request = DummyRequest([b""])
        request.isSecure = lambda: False
        for name, value in ((b"Connection", b"Authorization, X-Hop"), (b"X-Hop", b"h"), (b"X-Named", b"n"),
                            (b"X-Added", b"a"), (b"X-Forwarded-For", b"10.0.0.1")):
            request.requestHeaders.addRawHeader(name, value)
        opened = [(b"Authorization", b"Bearer t")]
        headers = upstream_headers(request, (), opened, allowed={b"x-named"})
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer t"])
        self.assertEqual(headers.getRawHeaders(b"x-named"), [b"n"])
        self.assertFalse(headers.hasHeader(b"x-added"))
        self.assertFalse(headers.hasHeader(b"x-hop"))
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for")[0].split(b", ")[0], b"10.0.0.1")

    def test_vary_merged(self):
        """
        Copying an answer's headers over the relay's keeps the relay's value of a name both set, but Vary: its
        names are merged, case-insensitively (first spelling kept), and ``*`` among them makes it ``*``.
        """
        for upstream, relay, merged in (
            (
                [b"Accept-Encoding, authorization", b"Cookie"],
                [b"Origin"],
                [b"Accept-Encoding, authorization, Cookie, Origin"],
            ),
            ([b"origin,Accept"], [b"Origin"], [b"origin, Accept"]),
            ([b"*"], [b"Origin"], [b"*"]),
            ([b"Accept"], None, [b"Accept"]),
        ):
            target = Headers({b"x-service-name": [b"relay"]})
            if relay is not None:
                target.setRawHeaders(b"vary", relay)
            merge_end_to_end(Headers({b"vary": upstream, b"x-service-name": [b"up"]}), target)
            self.assertEqual(target.getRawHeaders(b"vary"), merged)
            self.assertEqual(target.getRawHeaders(b"x-service-name"), [b"relay"])


def _late(result, seconds):
    raise RelayError(504, f"late after {seconds}")


class PoolTests(SynchronousTestCase):
    def test_pool_drops_idle_connections_before_a_relay_does(self):
        """A pooled connection is dropped while idle before a relay (and the balancers in front of one, 60 s) drops
        it: a request then never goes out on a connection its server is closing, which lost it (502). A peer pool
        resends nothing."""
        pool = make_pool(MemoryReactorClock())
        self.assertLess(pool.cachedConnectionTimeout, min(CLIENT_IDLE_TIMEOUT, 60))
        self.assertTrue(pool.retryAutomatically)
        self.assertFalse(make_pool(MemoryReactorClock(), resend=False).retryAutomatically)


class IdleDeadlineTests(SynchronousTestCase):
    def test_time_starts_over_at_each_touch(self):
        """The wait expires ``seconds`` after the last touch, not after the start: the Deferred is then cancelled
        and fails with what ``on_timeout`` raises; no timer is left behind."""
        clock = Clock()
        deadline = IdleDeadline(clock, 5, _late)
        d = deadline.bound(Deferred())
        for _ in range(4):
            clock.advance(4)
            deadline.touch()
        self.assertNoResult(d)
        clock.advance(5)
        self.assertEqual(self.failureResultOf(d, RelayError).value.detail, "late after 5")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_result_in_time_passes_and_stops_the_timer(self):
        """A result before the time runs out passes through unchanged, and a later touch is harmless."""
        clock = Clock()
        deadline = IdleDeadline(clock, 5, _late)
        pending = Deferred()
        d = deadline.bound(pending)
        clock.advance(3)
        pending.callback("answer")
        deadline.touch()
        self.assertEqual(self.successResultOf(d), "answer")
        self.assertEqual(clock.getDelayedCalls(), [])


class BodyProducerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        # One step per clock turn, so that a test can act between chunks.
        self.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True, scheduler=lambda step: self.clock.callLater(1, step)
        )

    def run_clock(self, steps=100):
        for _ in range(steps):
            self.clock.advance(1)

    def test_transformed_body_and_length(self):
        """The body is read through the transform; the length is the transform's output length."""
        source = io.BytesIO(b"abc" * 30000)
        producer = RequestBodyProducer(source, 90000, Upper(), self.cooperator)
        self.assertEqual(producer.length, 90003)
        consumer = StringTransport()
        done = producer.startProducing(consumer)
        self.run_clock()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(consumer.value(), b"ABC" * 30000 + b"END")

    def test_progress_after_every_chunk(self):
        """``progress`` is called once per chunk the consumer took and once at the end (what keeps a steadily
        moving upload from timing out)."""
        calls = []
        source = io.BytesIO(b"x" * 100_000)
        producer = RequestBodyProducer(source, 100_000, None, self.cooperator, progress=lambda: calls.append(1))
        producer.startProducing(StringTransport())
        self.clock.advance(1)
        self.assertEqual(len(calls), 1)
        self.run_clock()
        self.assertEqual(len(calls), -(-100_000 // READ_SIZE) + 1)

    def test_unknown_length(self):
        """A transform that cannot tell its output size makes the length unknown (chunked upstream)."""
        self.assertIs(RequestBodyProducer(io.BytesIO(), 10, Upper(sized=False)).length, UNKNOWN_LENGTH)
        self.assertEqual(RequestBodyProducer(io.BytesIO(), 10).length, 10)

    def test_pause_stops_reading(self):
        """While paused, no more of the source is read."""
        source = io.BytesIO(b"x" * 1_000_000)
        producer = RequestBodyProducer(source, 1_000_000, None, self.cooperator)
        consumer = StringTransport()
        producer.startProducing(consumer)
        self.clock.advance(1)
        producer.pauseProducing()
        position = source.tell()
        self.assertLess(position, 1_000_000)
        self.run_clock()
        self.assertEqual(source.tell(), position)
        producer.resumeProducing()
        self.run_clock()
        self.assertEqual(len(consumer.value()), 1_000_000)
        producer.pauseProducing()  # after the end: harmless

    def test_closed_source_stops_quietly(self):
        """A body file closed while it is read (twisted.web closes it once the request is over, say answered early
        by the upstream) stops the production with no error to log: the Deferred never fires."""
        source = io.BytesIO(b"x" * 1_000_000)
        done = RequestBodyProducer(source, 1_000_000, None, self.cooperator).startProducing(StringTransport())
        self.clock.advance(1)
        source.close()
        self.run_clock()
        self.assertNoResult(done)

    def test_failing_source_without_closed_reports_its_error(self):
        """A body source that is only ``read``/``seek`` (what the client takes) and fails mid-read fails the upload
        with its own error, not an AttributeError for the ``closed`` it does not have."""

        class Broken:
            def __init__(self):
                self.reads = 0

            def read(self, size):
                self.reads += 1
                if self.reads > 1:
                    raise OSError("disk gone")
                return b"x" * size

            def seek(self, *args):
                pass

        done = RequestBodyProducer(Broken(), 1_000_000, None, self.cooperator).startProducing(StringTransport())
        self.run_clock()
        self.assertEqual(str(self.failureResultOf(done, OSError).value), "disk gone")

    def test_reads_whole_records_of_a_block_transform(self):
        """A codec decoder is fed one whole encoded record per read (its read_size), so no record is joined."""
        keys = message_keys()
        encoder = keys.body_encoder()
        plain = os.urandom(2 * RECORD_SIZE + 5)
        sealed = b"".join(encoder.feed(plain) + encoder.finish())
        source = ReadLog(sealed)
        consumer = StringTransport()
        done = RequestBodyProducer(source, len(sealed), keys.body_decoder(), self.cooperator).startProducing(consumer)
        self.run_clock()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(consumer.value(), plain)
        self.assertEqual(source.sizes, [RECORD_SIZE + TAG_SIZE, RECORD_SIZE + TAG_SIZE, 5 + TAG_SIZE, 0])

    def test_encoder_reads_whole_records(self):
        """A codec encoder is fed one record of plaintext per read; a body of exactly one read is written at once."""
        keys = message_keys()
        plain = os.urandom(2 * RECORD_SIZE + 5)
        source = ReadLog(plain)
        consumer = StringTransport()
        done = RequestBodyProducer(source, len(plain), keys.body_encoder(), self.cooperator).startProducing(consumer)
        self.run_clock()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(source.sizes, [RECORD_SIZE, RECORD_SIZE, 5, 0])
        decoder = keys.body_decoder()
        self.assertEqual(b"".join(decoder.feed(consumer.value()) + decoder.finish()), plain)
        for size, at_once in ((RECORD_SIZE, True), (RECORD_SIZE + 1, False)):
            producer = RequestBodyProducer(io.BytesIO(bytes(size)), size, keys.body_encoder(), self.cooperator)
            done = producer.startProducing(StringTransport())
            self.assertEqual(done.called, at_once)
            self.run_clock()
            self.assertIsNone(self.successResultOf(done))

    def test_small_body_written_at_once(self):
        """A body that fits one read is written when production starts, with no cooperative task to wait for."""
        producer = RequestBodyProducer(io.BytesIO(b"abc"), 3, Upper(), self.cooperator)
        consumer = StringTransport()
        done = producer.startProducing(consumer)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(consumer.value(), b"ABCEND")
        producer.stopProducing()  # after the end: harmless

    def test_transform_error_fails_production(self):
        """A RelayError from the transform stops the body and fails the production with it."""
        producer = RequestBodyProducer(io.BytesIO(b"ok" * 10 + b"!bad"), 24, Upper(fail_on=b"!"), self.cooperator)
        done = producer.startProducing(StringTransport())
        self.run_clock()
        self.assertEqual(self.failureResultOf(done, RelayError).value.code, 562)


class FakeBodyTransport(StringTransport):
    """The transport an agent response gives its body protocol."""

    def __init__(self):
        super().__init__()
        self.stopped = False

    def stopProducing(self):
        self.stopped = True


class FakeResponse:
    def __init__(self, code=200, headers=None, length=UNKNOWN_LENGTH):
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers(headers or {})
        self.length = length
        self.protocol = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class ClientRequest(DummyRequest):
    """A DummyRequest with a transport that takes a push producer the way twisted.web does."""

    def __init__(self):
        super().__init__([])
        self.transport = StringTransport()
        self.channel = object()  # connected: twisted.web sets it to None once the client is gone
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    @property
    def startedWriting(self):
        return bool(self.written)


client_request = ClientRequest


class StreamResponseTests(SynchronousTestCase):
    def test_head_copied_and_body_transformed(self):
        """Status and end-to-end headers are copied, relay-set names kept, the body goes through the transform."""
        response = FakeResponse(
            201, {b"set-cookie": [b"a=1", b"b=2"], b"x-service-name": [b"up"], b"keep-alive": [b"5"]}, length=4
        )
        request = client_request()
        request.responseHeaders.setRawHeaders(b"x-service-name", [b"relay"])
        transform = Upper()
        copy_response_head(response, request, transform)
        done = stream_response(response, request, transform)
        response.protocol.dataReceived(b"body")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(request.responseCode, 201)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-service-name"), [b"relay"])
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"keep-alive"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"7"])
        self.assertEqual(b"".join(request.written), b"BODYEND")
        self.assertEqual(request.finished, 1)

    def test_backpressure(self):
        """A slow client pauses the upstream body; resuming resumes it."""
        response = FakeResponse()
        request = client_request()
        stream_response(response, request)
        self.assertIs(request.producer, response.protocol)
        request.producer.pauseProducing()
        self.assertEqual(response.transport.producerState, "paused")
        request.producer.resumeProducing()
        self.assertEqual(response.transport.producerState, "producing")

    def test_silent_upstream_broken_off(self):
        """An upstream that sends nothing for the idle timeout while the client keeps up is broken off (504)."""
        clock = Clock()
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request, clock=clock, idle_timeout=10)
        for _ in range(3):
            clock.advance(9)
            response.protocol.dataReceived(b"more")
        self.assertNoResult(done)
        clock.advance(10)
        self.assertEqual(self.failureResultOf(done, RelayError).value.detail, "the upstream stopped sending its body")
        self.assertTrue(response.transport.stopped)
        self.assertTrue(request.transport.disconnecting)

    def test_client_that_stops_reading_broken_off(self):
        """A client that reads nothing for the idle timeout (the upstream paused for it) is broken off, both sides."""
        clock = Clock()
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request, clock=clock, idle_timeout=10)
        request.producer.pauseProducing()
        clock.advance(9)
        request.producer.resumeProducing()  # it read a little
        request.producer.pauseProducing()
        response.protocol.dataReceived(b"read before the pause")
        clock.advance(9)
        self.assertNoResult(done)
        clock.advance(1)
        self.assertEqual(self.failureResultOf(done, RelayError).value.detail, "the client stopped reading the answer")
        self.assertTrue(response.transport.stopped)
        self.assertTrue(request.transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pause_after_the_end_arms_nothing(self):
        """A client pausing the relay while the last of the body is written (the upstream is done) leaves no timer."""
        clock = Clock()
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request, Upper(), clock=clock, idle_timeout=10)
        producer = request.producer
        request.write = lambda data: producer.pauseProducing()  # the client's buffer fills on the tail
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_upstream_breaks_off(self):
        """An upstream failure after the answer started aborts the client connection instead of finishing it."""
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request)
        response.protocol.dataReceived(b"partial")
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionRefusedError())])))
        self.failureResultOf(done, ResponseFailed)
        self.assertTrue(request.transport.disconnecting)
        self.assertEqual(request.finished, 0)

    def test_transform_error_mid_stream(self):
        """A transform error mid-stream stops the upstream and aborts the client."""
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request, Upper(fail_on=b"!"))
        response.protocol.dataReceived(b"fine")
        response.protocol.dataReceived(b"!")
        self.assertEqual(self.failureResultOf(done, RelayError).value.code, 562)
        self.assertTrue(response.transport.stopped)
        self.assertTrue(request.transport.disconnecting)
        self.assertEqual(b"".join(request.written), b"FINE")

    def test_failure_before_anything_written_left_to_the_caller(self):
        """A transform error on the first data of an answer with a length, before any of it went out, stops the
        upstream but leaves the client connection alone, so that the caller can answer the error instead of a bare
        reset."""
        response = FakeResponse(length=10)
        request = client_request()
        done = stream_response(response, request, Upper(fail_on=b"!"))
        response.protocol.dataReceived(b"!")
        self.assertEqual(self.failureResultOf(done, RelayError).value.code, 562)
        self.assertTrue(response.transport.stopped)
        self.assertFalse(request.transport.disconnecting)
        self.assertEqual((request.written, request.finished), ([], 0))

    def test_stream_head_goes_out_at_once(self):
        """The head of an answer without a length (a stream, which may stay quiet) is written before any body
        arrives; one with a length waits for its first bytes (so that an early failure can still be answered)."""
        for length, started in ((UNKNOWN_LENGTH, True), (10, False)):
            request = client_request()
            stream_response(FakeResponse(length=length), request)
            self.assertEqual(bool(request.startedWriting), started, length)
            self.assertEqual(b"".join(request.written), b"")

    def test_client_gone_stops_upstream(self):
        """A client disconnect stops reading the upstream body."""
        response = FakeResponse()
        request = client_request()
        done = stream_response(response, request)
        request.processingFailed(Failure(ConnectionRefusedError()))
        self.assertTrue(response.transport.stopped)
        response.protocol.connectionLost(Failure(ResponseFailed([])))
        self.failureResultOf(done)


class ErrorMappingTests(SynchronousTestCase):
    def test_mapping(self):
        """A transform's RelayError wrapped by the agent keeps its code; other failures are 502."""
        wrapped = RequestTransmissionFailed([Failure(RelayError(562))])
        self.assertEqual(upstream_error(Failure(wrapped)).code, 562)
        self.assertEqual(upstream_error(Failure(ConnectionRefusedError())).code, 502)
        self.assertEqual(upstream_error(Failure(RelayError(504))).code, 504)

    def test_interface(self):
        """AgentUpstreamClient provides IUpstreamClient and passes requests to its agent."""
        calls = []

        class Agent:
            def request(self, *args):
                calls.append(args)
                return Deferred()

        client = AgentUpstreamClient(Agent())
        verifyObject(IUpstreamClient, client)
        client.request(b"GET", b"http://x/", Headers(), None)
        self.assertEqual(calls, [(b"GET", b"http://x/", Headers(), None)])
