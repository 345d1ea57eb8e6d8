"""
``mterelay.eager``: what a read event writes is on the wire when the event ends, and the reactor still handles what
it must (closing connections, full socket buffers). Real sockets on 127.0.0.1; a test calls a connection's
``doRead`` itself, as the reactor would, and then looks at the peer's socket before the reactor runs again.
"""

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import ClientFactory, Factory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from zope.interface import providedBy
from zope.interface.verify import verifyObject

from mterelay.eager import EagerTCPReactor
from tests.redis_server import self_signed_certificate


class _Scripted(Protocol):
    """Runs ``script(transport, data)`` on every read; ``made`` and ``lost`` fire with the protocol."""

    def __init__(self, script=None):
        self.script = script
        self.made = Deferred()
        self.lost = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.script(self.transport, data)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(self)


def _factory(kind, protocol):
    factory = kind()
    factory.buildProtocol = lambda addr: protocol
    return factory


def _waiting(sock):
    """The bytes ``sock`` has received so far, without blocking (b"" when none)."""
    try:
        return sock.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class EagerTCPTests(TestCase):
    def setUp(self):
        self.network = EagerTCPReactor(reactor)

    async def serve(self, script):
        """An eager server connection running ``script`` and the raw socket at its other end."""
        protocol = _Scripted(script)
        port = self.network.listenTCP(0, _factory(ServerFactory, protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        raw = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(raw.close)
        await protocol.made
        self.addCleanup(lambda: protocol.lost)
        self.addCleanup(protocol.transport.abortConnection)
        return protocol, raw

    async def until(self, condition, what):
        """Let the reactor run until ``condition()`` holds (2 s at most)."""
        for _ in range(2000):
            if condition():
                return
            await deferLater(reactor, 0.001, lambda: None)
        self.fail(f"the reactor never {what}")

    async def test_answer_is_sent_after_the_batch_without_polling_for_it(self):
        """
        An answer written while handling a read goes out once the reactor is done with the batch (here, one read),
        and the poller was never asked to watch for writability: two epoll_ctl calls and a dispatch saved per answer.
        """
        server, raw = await self.serve(lambda transport, data: transport.write(b"pong:" + data))
        watched = []
        self.patch(reactor, "addWriter", watched.append)
        raw.sendall(b"ping")
        server.transport.doRead()
        await self.until(lambda: _waiting(raw) == b"pong:ping", "sent the answer")
        self.assertEqual(watched, [])

    async def upstreams(self, count):
        """``count`` eager client connections and the raw sockets at their other ends."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        connections = []
        for _ in range(count):
            upstream = _Scripted()
            self.network.connectTCP("127.0.0.1", listener.getsockname()[1], _factory(ClientFactory, upstream))
            await upstream.made
            peer, _ = listener.accept()
            self.addCleanup(peer.close)
            self.addCleanup(lambda upstream=upstream: upstream.lost)
            self.addCleanup(upstream.transport.abortConnection)
            connections.append((upstream.transport, peer))
        return connections

    async def test_a_full_batch_is_sent_when_its_read_ends(self):
        """
        Once ``batch`` connections have data to send, the read event that made them so sends it all as it ends,
        whichever connections they are (here two upstreams written while reading from a client).
        """
        self.network = EagerTCPReactor(reactor, batch=2)
        (first, first_peer), (second, second_peer) = await self.upstreams(2)

        def forward(transport, data):
            first.writeSequence([b"to ", data])
            if data == b"both":
                second.write(b"and " + data)

        server, raw = await self.serve(forward)
        raw.sendall(b"one")
        server.transport.doRead()
        self.assertEqual(_waiting(first_peer), b"")
        raw.sendall(b"both")
        server.transport.doRead()
        self.assertEqual(_waiting(first_peer), b"to oneto both")
        self.assertEqual(_waiting(second_peer), b"and both")

    async def test_closing_connection_still_closes(self):
        """A connection closed after writing during a read gets its data and then its end, by the reactor."""

        def answer_and_close(transport, data):
            transport.write(b"bye")
            transport.loseConnection()

        server, raw = await self.serve(answer_and_close)
        raw.sendall(b"x")
        server.transport.doRead()
        await server.lost.addTimeout(5, reactor)
        self.assertEqual(raw.recv(100), b"bye")
        self.assertEqual(raw.recv(100), b"")

    async def test_close_without_writing_after_an_earlier_write(self):
        """
        A connection written to outside any read (listed for the next flush, sent by the reactor) and then closed
        during a read without writing still closes: the pending flush must not swallow the close.
        """
        server, raw = await self.serve(lambda transport, data: transport.loseConnection())
        server.transport.write(b"early")
        received = []
        await self.until(lambda: received.append(_waiting(raw)) or b"early" in b"".join(received), "sent it")
        raw.sendall(b"x")
        server.transport.doRead()
        await server.lost.addTimeout(5, reactor)
        self.assertEqual(raw.recv(100), b"")

    async def test_half_closed_connection_reads_to_the_end(self):
        """
        A client that sent its request and half-closed (outside any read) reads the whole answer: the read events
        that bring it must not flush the half-closed connection again (a send after the half-close fails with EPIPE
        and would end the connection).
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        received = []

        class HalfClosing(_Scripted):
            def connectionMade(self):
                self.transport.write(b"request")
                self.transport.loseWriteConnection()
                super().connectionMade()

        client = HalfClosing(lambda transport, data: received.append(data))
        self.network.connectTCP("127.0.0.1", listener.getsockname()[1], _factory(ClientFactory, client))
        await client.made
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        request = []

        def request_ended():
            try:
                data = peer.recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            request.append(data)
            return data == b""

        await self.until(request_ended, "sent the request and its end")
        self.assertEqual(b"".join(request), b"request")
        peer.sendall(b"part 1, ")
        await self.until(lambda: b"".join(received) == b"part 1, ", "delivered part 1")
        peer.sendall(b"part 2")
        peer.close()
        await client.lost.addTimeout(5, reactor)
        self.assertEqual(b"".join(received), b"part 1, part 2")
        self.assertTrue(client.reason.check(ConnectionDone))

    async def test_a_failing_connection_does_not_strand_the_others(self):
        """
        When sending one connection's data raises, the other connections of the flush still send theirs, and the
        failing one goes back to the reactor (which sends it here, the failure having been a one-off).
        """
        self.network = EagerTCPReactor(reactor, batch=2)
        (first, first_peer), (second, second_peer) = await self.upstreams(2)
        send = first.doWrite

        def fail_once():
            del first.doWrite
            raise RuntimeError("one-off failure")

        first.doWrite = fail_once
        server, raw = await self.serve(lambda transport, data: [first.write(b"1:" + data), second.write(b"2:" + data)])
        raw.sendall(b"x")
        server.transport.doRead()
        self.assertEqual(_waiting(second_peer), b"2:x")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(first, reactor.getWriters())
        await self.until(lambda: _waiting(first_peer) == b"1:x", "sent the failed connection's data")
        self.assertEqual(first.doWrite, send)

    async def test_what_does_not_fit_is_left_to_the_reactor(self):
        """A write larger than the socket takes at once is partly sent, and the reactor sends the rest."""
        self.network = EagerTCPReactor(reactor, batch=1)
        size = 8 << 20
        server, raw = await self.serve(lambda transport, data: transport.write(b"z" * size))
        raw.sendall(b"x")
        server.transport.doRead()
        self.assertIn(server.transport, reactor.getWriters())
        received = []
        await self.until(lambda: received.append(len(_waiting(raw))) or sum(received) == size, "sent the rest")
        self.assertEqual(sum(received), size)


    async def test_tls_over_eager_connections(self):
        """TLS (an https upstream or peer) runs over these connections: handshake, request and answer both ways."""
        directory = self.mktemp()
        os.makedirs(directory)
        key_path, certificate_path = self_signed_certificate(directory)
        with open(key_path, "rb") as key, open(certificate_path, "rb") as certificate:
            pem = certificate.read()
            server_options = PrivateCertificate.loadPEM(key.read() + pem).options()
        server = _Scripted(lambda transport, data: transport.write(b"pong:" + data))
        tls_factory = TLSMemoryBIOFactory(server_options, False, _factory(ServerFactory, server))
        port = self.network.listenTCP(0, tls_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        answers = []
        client = _Scripted()
        client.dataReceived = answers.append
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(pem)),
            TCP4ClientEndpoint(self.network, "127.0.0.1", port.getHost().port),
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: server.lost)
        self.addCleanup(lambda: client.lost)
        self.addCleanup(client.transport.loseConnection)
        client.transport.write(b"hello")
        await self.until(lambda: b"".join(answers) == b"pong:hello", "carried the answer")


class EagerTCPReactorTests(TestCase):
    def test_it_is_the_reactor_in_every_other_respect(self):
        """It provides IReactorTCP and every interface of the reactor it wraps, whose methods it hands out."""
        network = EagerTCPReactor(reactor)
        self.assertTrue(verifyObject(IReactorTCP, network))
        self.assertLessEqual(set(providedBy(reactor)), set(providedBy(network)))
        self.assertEqual(network.callLater, reactor.callLater)
