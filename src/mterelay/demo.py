"""
A tiny demo upstream for trying the relay: ``python -m mterelay.demo upstream --port 8081``.

It answers every request with a JSON description of what it received (method, path, query, body size), so that a
pass-through or MTE route can be seen to reach it. It is not part of the relay.
"""

import argparse
import json
import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web import server
from twisted.web.resource import Resource

log = Logger()
READ_SIZE = 64 * 1024


class DemoUpstream(Resource):
    """Describes each request it receives."""

    isLeaf = True

    def render(self, request):
        size = 0
        while chunk := request.content.read(READ_SIZE):
            size += len(chunk)
        path, _, query = request.uri.decode("latin-1").partition("?")
        log.info("demo upstream: {method} {path} ({size} bytes)", method=request.method.decode(), path=path, size=size)
        request.setHeader(b"content-type", b"application/json")
        answer = {"upstream": "mterelay demo", "method": request.method.decode(), "path": path, "query": query,
                  "body_bytes": size}
        return json.dumps(answer).encode()


def main(reactor, argv):
    parser = argparse.ArgumentParser(prog="python -m mterelay.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    upstream = commands.add_parser("upstream", help="run the demo upstream")
    upstream.add_argument("--port", type=int, default=8081)
    upstream.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = server.Site(DemoUpstream())
    site.noisy = False
    d = TCP4ServerEndpoint(reactor, args.port, interface=args.interface).listen(site)
    d.addCallback(lambda port: log.info("demo upstream on http://{interface}:{port}", interface=args.interface,
                                        port=port.getHost().port))
    # A Deferred that never fires: serve until interrupted.
    return d.addCallback(lambda _: Deferred())


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
