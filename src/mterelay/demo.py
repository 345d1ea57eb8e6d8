"""
Demos for trying the relay; not part of the relay itself.

``python -m mterelay.demo upstream --port 8081``
    A small upstream that answers every request with a JSON description of what it received (method, path, query,
    headers, body size), so that a pass-through or MTE route can be seen to reach it.

``python -m mterelay.demo chain``
    The whole relay-to-relay chain on loopback, in one process: a demo upstream, relay B (inbound), a forwarder that
    records the bytes between the relays, and relay A (outbound). It sends one request through, as an application
    would, and prints what each hop sees: plain at the application, encoded between the relays, plain at the upstream.
"""

import argparse
import io
import json
import secrets
import sys

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols import portforward
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

log = Logger()
READ_SIZE = 64 * 1024


class DemoUpstream(Resource):
    """Describes each request it receives; ``last`` is the newest description."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.last = None

    def render(self, request):
        size = 0
        while chunk := request.content.read(READ_SIZE):
            size += len(chunk)
        path, _, query = request.uri.decode("latin-1").partition("?")
        log.info("demo upstream: {method} {path} ({size} bytes)", method=request.method.decode(), path=path, size=size)
        self.last = {
            "upstream": "mterelay demo",
            "method": request.method.decode(),
            "path": path,
            "query": query,
            "headers": {
                name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            "body_bytes": size,
        }
        request.setHeader(b"content-type", b"application/json")
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"session=demo-session-42; HttpOnly", b"theme=dark"])
        return json.dumps(self.last).encode()


class _RecordingServer(portforward.ProxyServer):
    def dataReceived(self, data):
        self.factory.record(">", data)
        super().dataReceived(self.factory.rewrite(">", data))


class _RecordingClient(portforward.ProxyClient):
    def dataReceived(self, data):
        self.peer.factory.record("<", data)
        super().dataReceived(self.peer.factory.rewrite("<", data))


class _RecordingClientFactory(portforward.ProxyClientFactory):
    protocol = _RecordingClient


class WireRecorder(portforward.ProxyFactory):
    """
    A TCP forwarder to ``host:port`` that keeps every byte of both directions (``>`` towards ``port``, ``<`` back),
    as an eavesdropper between two relays would see them. For demos and tests: it holds everything in memory.
    """

    protocol = _RecordingServer

    def __init__(self, host, port):
        super().__init__(host, port)
        self.recorded = []

    def record(self, direction, data):
        if self.recorded and self.recorded[-1][0] == direction:
            self.recorded[-1] = (direction, self.recorded[-1][1] + data)
        else:
            self.recorded.append((direction, data))

    def rewrite(self, direction, data):
        """What is passed on for ``data`` (as it was: tests override this to play a man in the middle)."""
        return data

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.clientProtocolFactory = _RecordingClientFactory
        return protocol

    @property
    def wire(self):
        """Every byte seen, both directions, in order."""
        return b"".join(data for _, data in self.recorded)


def _printable(data, width=110):
    """Wire bytes as text lines: non-printable bytes as '.', long lines cut."""
    lines = []
    for line in data.split(b"\r\n"):
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in line)
        lines.append(text if len(text) <= width else text[:width] + f"... ({len(text)} bytes)")
    return lines


async def _listen(reactor, factory):
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return f"http://127.0.0.1:{port.getHost().port}"


async def chain(reactor, out, encode_type="MKE"):
    """Start upstream, relay B, the recorder and relay A; send one request; print every hop. Returns the recorder."""
    from mterelay.codec import RelayIdentity
    from mterelay.config import Settings
    from mterelay.registry import MemoryRegistry
    from mterelay.site import build_site
    from mterelay.upstream import make_agent, make_pool

    def relay_site(**settings):
        settings = Settings(upstream=upstream_url, client_id_secrets=(secrets.token_urlsafe(32),), **settings)
        agents = make_agent(reactor, make_pool(reactor)), make_agent(reactor, make_pool(reactor, resend=False))
        return build_site(settings, reactor, agents[0], MemoryRegistry(reactor), RelayIdentity.generate(),
                          peer_agent=agents[1])

    upstream = DemoUpstream()
    upstream_url = await _listen(reactor, server.Site(upstream))
    relay_b = await _listen(reactor, relay_site())
    recorder = WireRecorder("127.0.0.1", int(relay_b.rsplit(":", 1)[1]))
    peer = await _listen(reactor, recorder)
    token = secrets.token_urlsafe(16)
    relay_a = await _listen(reactor, relay_site(outbound_token=token, allowed_peers=(peer,)))

    body = b'{"email": "jim.halpert@example.com", "password": "P@ssw0rd!"}'
    headers = {
        b"x-mte-outbound-token": [token.encode()],
        b"x-mte-upstream": [peer.encode()],
        b"x-mte-encode-type": [encode_type.encode()],
        b"content-type": [b"application/json"],
        b"authorization": [b"Bearer demo-token-123"],
        b"cookie": [b"Cookie_1=value"],
    }
    write = out.write
    write(f"demo upstream {upstream_url}; relay B {relay_b}; recorder {peer} -> B; relay A {relay_a}\n\n")
    write(f"1. The application sends a plain request to relay A ({relay_a}):\n")
    write("   POST /api/login?next=%2Fhome\n")
    for name, values in headers.items():
        shown = b"<token>" if name == b"x-mte-outbound-token" else values[0]
        write(f"   {name.decode()}: {shown.decode()}\n")
    write(f"   {body.decode()}\n\n")

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(
        b"POST", (relay_a + "/api/login?next=%2Fhome").encode(), Headers(headers), FileBodyProducer(io.BytesIO(body))
    )
    answer = await treq.content(response)

    write("2. Between relay A and relay B (what a proxy, a load balancer or an eavesdropper sees):\n")
    for direction, data in recorder.recorded:
        write("   A -> B\n" if direction == ">" else "   B -> A\n")
        for line in _printable(data):
            write(f"     {line}\n")
    write("\n3. The upstream behind relay B receives the plain request:\n")
    seen = upstream.last
    write(f"   {seen['method']} {seen['path']}?{seen['query']} ({seen['body_bytes']} body bytes)\n")
    for name in ("content-type", "authorization", "cookie"):
        write(f"   {name}: {seen['headers'].get(name, ['(missing)'])[0]}\n")
    write(f"\n4. The application receives the plain answer from relay A: {response.code}\n")
    for name, values in response.headers.getAllRawHeaders():
        for value in values:
            write(f"   {name.decode()}: {value.decode('latin-1')}\n")
    write(f"   {answer.decode()[:200]}\n")
    for plain in (b"jim.halpert", b"demo-token-123", b"Cookie_1=value", b"/api/login", b"demo-session-42"):
        if plain in recorder.wire:
            write(f"\nPLAINTEXT LEAK between the relays: {plain!r}\n")
            raise SystemExit(1)
    write("\nNone of the path, query, protected headers, cookies or bodies crossed between the relays in plaintext.\n")
    return recorder


def _serve_upstream(reactor, args):
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    site = server.Site(DemoUpstream())
    site.noisy = False
    d = TCP4ServerEndpoint(reactor, args.port, interface=args.interface).listen(site)
    d.addCallback(
        lambda port: log.info(
            "demo upstream on http://{interface}:{port}", interface=args.interface, port=port.getHost().port
        )
    )
    d.addErrback(_cannot_listen)
    # A Deferred that never fires: serve until interrupted.
    return d.addCallback(lambda _: Deferred())


def _cannot_listen(failure):
    failure.trap(CannotListenError)
    raise SystemExit(f"mterelay.demo: error: {failure.value}")


def main(reactor, argv):
    parser = argparse.ArgumentParser(prog="python -m mterelay.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    upstream = commands.add_parser("upstream", help="run the demo upstream")
    upstream.add_argument("--port", type=int, default=8081)
    upstream.add_argument("--interface", default="127.0.0.1")
    chained = commands.add_parser("chain", help="send one request through upstream <- B <- A and show every hop")
    chained.add_argument("--encode-type", choices=("MKE", "MTE"), default="MKE")
    args = parser.parse_args(argv)
    if args.command == "upstream":
        return _serve_upstream(reactor, args)
    return ensureDeferred(chain(reactor, sys.stdout, args.encode_type))


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
