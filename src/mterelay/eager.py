"""
TCP connections that send what a read event wrote as soon as that event has been handled.

A Twisted reactor handles every descriptor that one poll reported before it sends anything written meanwhile: a
write only queues the data and asks to be told when the socket is writable, which is learnt at the next poll. Under
load one poll reports a hundred sockets, so a request that relay A handles first waits for the ninety-nine others
before A sends it to relay B, while B, having sent its own answers the same way, has nothing to do. The two processes
take turns instead of working side by side: at saturation on two cores each sat idle a third of the time.

``EagerTCPReactor`` wraps a reactor so that the TCP connections it makes and accepts send, at the end of each read
event, what that event wrote on any of them. Writes are still coalesced per event (a response's head and body go in
one ``send``), nothing changes for a connection whose peer is slow (its data stays queued and the reactor sends it
when the socket drains), and a connection that is closing, half-closed or paused by its producer is left entirely to
the reactor. Everything else (time, threads, name resolution, TLS, UNIX sockets) is the wrapped reactor's.
"""

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTCP
from zope.interface import directlyProvides, implementer, providedBy


class _Flusher:
    """
    The connections written to since the last read event ended (each listed once, so the list is bounded by the open
    connections), and whether a read event is being handled now.
    """

    def __init__(self):
        self.pending = []
        self.reading = False

    def flush(self):
        pending, self.pending = self.pending, []
        for connection in pending:
            connection.sendQueued()


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
        if not self._listed:
            self._listed = True
            self._flusher.pending.append(self)

    def startWriting(self):
        # Data written during a read event is sent when the event ends: asking the poller about writability (an
        # epoll_ctl now and another once sent) is only needed if that send leaves something behind.
        if not (self._listed and self._flusher.reading):
            super().startWriting()

    def doRead(self):
        flusher = self._flusher
        flusher.reading = True
        try:
            return super().doRead()
        finally:
            flusher.reading = False
            flusher.flush()

    def sendQueued(self):
        """
        Send what is queued now instead of at the next poll, unless the reactor has to handle this connection's
        state: closing or half-closing (the reactor ends it once the data is out) or a producer waiting to be resumed.
        Whatever is left (a full socket buffer, a send error) is handed to the reactor, which sends it or finds the
        error when it polls.
        """
        self._listed = False
        if not self.connected:
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
    instance to the listening endpoints and to the agents, so that what a request writes to an upstream is sent at
    the end of the read that brought the request.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._flusher = _Flusher()
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
