"""
Log output: text or JSON lines, filtered at INFO (DEBUG when ``Settings.debug``), and request ids.

Modules log through their own module-level ``twisted.logger.Logger`` with structured fields; no field ever holds a
secret or a body.
"""

import re
import secrets
import sys

from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

REQUEST_ID_HEADER = b"x-request-id"
# A caller's request id is echoed only when it is short and harmless in a header and a log line.
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def make_observer(log_format, debug, out):
    """An ``ILogObserver`` writing ``text`` or ``json`` lines to the file ``out``, at INFO or (debug) DEBUG level."""
    if log_format == "json":
        observer = jsonFileLogObserver(out, recordSeparator="")
    else:
        observer = textFileLogObserver(out)
    level = LogLevel.debug if debug else LogLevel.info
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def output_for(twistd_options):
    """Where twistd would log: stdout under ``--nodaemon``, ``--logfile=-`` or outside twistd, else the log file."""
    if twistd_options is None:
        return sys.stdout
    logfile = twistd_options.get("logfile")
    if logfile == "-" or (not logfile and twistd_options.get("nodaemon")):
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


class LoggingService(MultiService):
    """
    Installs the relay's log observer for as long as it runs, around its child services.

    Under twistd its parent is the ``Application``: the observer is offered there as the ``ILogObserver`` component,
    which twistd then uses instead of its default observer (so lines are not written twice). Elsewhere the observer is
    added to the global log publisher while the service runs.
    """

    def __init__(self, observer, publisher=globalLogPublisher):
        super().__init__()
        self._observer = observer
        self._publisher = publisher
        self._offered = False

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self._observer)
            self._offered = True

    def startService(self):
        if not self._offered:
            self._publisher.addObserver(self._observer)
        super().startService()

    def stopService(self):
        stopping = super().stopService()
        if not self._offered:
            stopping.addBoth(lambda result: self._publisher.removeObserver(self._observer) or result)
        return stopping


def request_id(request):
    """The request's ``x-request-id`` when it is a safe token, else a fresh random one (hex)."""
    given = request.requestHeaders.getRawHeaders(REQUEST_ID_HEADER, [None])[0]
    if given is not None and _SAFE_ID.match(given):
        return given.decode("ascii")
    return secrets.token_hex(8)
