"""
TCP connections that send what the reactor's read events wrote as soon as the poll batch is handled, and every
``batch`` connections during a long one, without asking the poller about writability.

A Twisted reactor sends nothing during a poll batch: a write queues the data and registers the socket for
writability (an ``epoll_ctl``), the next poll reports it writable, a second dispatch sends it and unregisters it
(another ``epoll_ctl``). Under load one poll reports a hundred sockets, so relay A handled a hundred requests before
relay B saw the first of them, and B's answers came back the same way: the two processes took turns instead of
working side by side (at saturation on two cores each sat idle a third of the time), and every message cost two
``epoll_ctl`` calls and one dispatch more than its ``send``.

``EagerTCPReactor`` wraps a reactor so that the TCP connections it makes and accepts send what read events wrote
(on any of them) right after the poll batch, before the reactor polls again, and during a long batch each time
``batch`` connections have something to send, so that the next hop always has work. Writes are still coalesced (a
response's head and body go in one ``send``), a connection whose peer is slow keeps its data queued for the reactor
to send when the socket drains, and a connection that is closing, half-closed or paused by its producer is left
entirely to the reactor. Everything else (time, threads, name resolution, UNIX sockets, listening with ``ssl:``) is
the wrapped reactor's; TLS from ``wrapClientTLS`` or ``TLSMemoryBIOFactory`` rides on these connections.
"""

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from zope.interface import directlyProvides, implementer, providedBy

log = Logger()

#: Connections with data to send that make a read event flush at once instead of at the end of the poll batch. At
#: saturation with 100 connections (relay A, B and the upstream on two cores, memory registry) the relay chain
#: answered 1,869 / 2,068 / 2,164 / 2,270 / 2,118 / 2,058 req/s flushing every 4 / 16 / 32 / 64 / 128 / only at
#: the end of the batch, against 1,620-1,750 flushing after every read event and 1,430-1,510 with the reactor's own
#: sends (the plain two-hop Twisted chain: 1,980-2,070 in the same runs).
BATCH = 64


class _Flusher:
    """
    The connections written to since the last flush, each listed once (a connection that closes meanwhile stays
    listed until that flush, which skips it), and whether a read event is being handled now.
    """

    def __init__(self, clock, batch):
        self.pending = []
        self.reading = False
        self._clock = clock
        self._batch = batch
        self._after_batch = None

    def read_done(self):
        if len(self.pending) >= self._batch:
            self.flush()
        elif self.pending and self._after_batch is None:
            # A zero delay runs once the reactor has handled the whole poll batch, before it polls again.
            self._after_batch = self._clock.callLater(0, self._batch_done)

    def _batch_done(self):
        self._after_batch = None
        self.flush()

    def flush(self):
        pending, self.pending = self.pending, []
        for connection in pending:
            try:
                connection.sendQueued()
            except Exception:
                # One connection's failure must not strand the others' data: this one goes back to the reactor,
                # whose own doWrite meets the same failure and ends the connection there.
                log.failure("sending a connection's queued data failed; the reactor takes it back")
                connection.startWriting()


class _EagerWrites:
    """Mixin for ``tcp.Connection`` classes whose ``_flusher`` is set when they are made."""

    _flusher = None
    _listed = False

    def write(self, data):
        self._list()
        super().write(data)

    def writeSequence(self, iovec):
        self._list()
        super().writeSequence(iovec)

    def _list(self):
        # A write to a closed or half-closed connection is dropped by Twisted: nothing to send later.
        if not self._listed and self.connected and not self._writeDisconnected:
            self._listed = True
            self._flusher.pending.append(self)

    def startWriting(self):
        # Data written during a read event is sent by the flusher: asking the poller about writability (an epoll_ctl
        # now and another once sent) is only needed if that send leaves something behind.
        if not (self._listed and self._flusher.reading):
            super().startWriting()

    def doRead(self):
        flusher = self._flusher
        flusher.reading = True
        try:
            return super().doRead()
        finally:
            flusher.reading = False
            flusher.read_done()

    def sendQueued(self):
        """
        Send what is queued now instead of at the next poll, unless the reactor has to handle this connection's
        state: closing or half-closing (the reactor ends it once the data is out) or a producer waiting to be resumed.
        Whatever is left (a full socket buffer, a send error) is handed to the reactor, which sends it or finds the
        error when it polls.
        """
        self._listed = False
        if not self.connected or self._writeDisconnected:
            # Gone, or half-closed already (a write would fail with EPIPE and end the reading half too).
            return
        if self.disconnecting or self._writeDisconnecting:
            self.startWriting()
        elif self._queued():
            if self.producer is None or (self.streamingProducer and not self.producerPaused):
                self.doWrite()
            if self._queued():
                self.startWriting()

    def _queued(self):
        return self._tempDataLen or self.offset < len(self.dataBuffer)


class _Server(_EagerWrites, tcp.Server):
    def __init__(self, sock, protocol, client, server, sessionno, reactor):
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        self._flusher = server.flusher


class _Port(tcp.Port):
    transport = _Server

    def __init__(self, port, factory, backlog, interface, reactor, flusher):
        super().__init__(port, factory, backlog, interface, reactor)
        self.flusher = flusher


class _Client(_EagerWrites, tcp.Client):
    def __init__(self, host, port, bindAddress, connector, reactor):
        self._flusher = connector.flusher
        super().__init__(host, port, bindAddress, connector, reactor)


class _Connector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, bindAddress, reactor, flusher):
        super().__init__(host, port, factory, timeout, bindAddress, reactor)
        self.flusher = flusher

    def _makeTransport(self):
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


@implementer(IReactorTCP)
class EagerTCPReactor:
    """
    ``reactor`` with eager-sending TCP (``listenTCP``, ``connectTCP``); it provides every interface ``reactor``
    provides, so endpoints (``serverFromString``, ``HostnameEndpoint``) take it in the reactor's place. Give the same
    instance to the listening endpoints and to the agents, so that what requests write to an upstream goes out with
    the answers of the same batch. ``batch``: see ``BATCH``.
    """

    def __init__(self, reactor, batch=BATCH):
        self._reactor = reactor
        self._flusher = _Flusher(reactor, batch)
        directlyProvides(self, providedBy(reactor))

    def __repr__(self):
        return f"<EagerTCPReactor over {self._reactor!r}>"

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = _Port(port, factory, backlog, interface, self._reactor, self._flusher)
        listening.startListening()
        return listening

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = _Connector(host, port, factory, timeout, bindAddress, self._reactor, self._flusher)
        connector.connect()
        return connector
