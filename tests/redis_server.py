"""
A private redis-server for tests and benchmarks: its own port on 127.0.0.1, its own directory, never another instance.

    server = RedisServer.start(directory)       # blocks until it answers PING
    server.url                                   # redis://127.0.0.1:<port>/0 (with the password, if any)
    server.command("INFO", "stats")              # one blocking command, for checks outside Twisted
    server.stop(); server.restart()

Test cases mix in ``RedisServerMixin`` and call ``self.start_redis(...)``: the server is stopped by the test's cleanup.
"""

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.trial.unittest import SkipTest

EXECUTABLE = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0
START_ATTEMPTS = 5


class _PortTaken(Exception):
    """Another process listens on the port chosen for a redis-server."""


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_certificate(directory):
    """Write a key and a self-signed certificate for 127.0.0.1 into ``directory``; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "tls.key"), os.path.join(directory, "tls.crt")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _read_reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis-server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ValueError(f"unexpected reply {line!r}")


class RedisServer:
    """One redis-server process; see the module docstring."""

    def __init__(self, directory, port, password=None, persistent=False, unix_socket=False, tls=False):
        self.directory = directory
        self.port = port
        self.host = "127.0.0.1"
        self.password = password
        self.persistent = persistent
        self.socket_path = os.path.join(directory, "redis.sock") if unix_socket else None
        # Always listened on: a private socket in our own directory, so readiness is asked of our process only.
        self._control_path = self.socket_path or os.path.join(directory, "control.sock")
        #: With ``tls``: the server's self-signed certificate (PEM), the trust root a client needs.
        self.certificate_path = None
        self.tls = tls
        self.process = None

    @classmethod
    def start(cls, directory=None, password=None, persistent=False, unix_socket=False, tls=False):
        """
        Start a server in ``directory`` (default: a new temporary one) and return it once it answers.

        ``persistent`` keeps an append-only file (fsync on every write) so data survives ``restart``; otherwise
        nothing is ever written to disk. ``unix_socket`` also listens on ``<directory>/redis.sock``. ``tls`` serves
        TLS only (``rediss://``) with a self-signed certificate, ``certificate_path``.
        """
        directory = directory or tempfile.mkdtemp(prefix="mterelay-redis-")
        # A free port can be taken by someone else before redis-server binds it: then try another.
        for attempt in range(START_ATTEMPTS):
            server = cls(directory, free_port(), password, persistent, unix_socket, tls)
            try:
                server._launch()
                return server
            except _PortTaken:
                if attempt == START_ATTEMPTS - 1:
                    raise RuntimeError(f"redis-server found no free port in {START_ATTEMPTS} attempts") from None

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def unix_url(self):
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}?db=0"

    def _launch(self):
        args = [
            EXECUTABLE,
            "--bind", self.host,
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
            "--daemonize", "no",
            "--save", "",
        ]  # fmt: skip
        if self.tls:
            key_path = os.path.join(self.directory, "tls.key")
            if self.certificate_path is None:
                key_path, self.certificate_path = self_signed_certificate(self.directory)
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", self.certificate_path, "--tls-key-file", key_path]
            args += ["--tls-ca-cert-file", self.certificate_path]
        else:
            args += ["--port", str(self.port)]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += ["--unixsocket", self._control_path, "--unixsocketperm", "700"]
        with open(os.path.join(self.directory, "redis.log"), "w"):
            pass  # this launch's log only: a failed launch before it must not decide why this one fails
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                # Asked on our private socket, never on the port (whoever else may listen there is not told our
                # password): redis-server binds its TCP port before it serves, and exits if the port is taken.
                if self._exchange(self._connect_control(), ("PING",)) == b"PONG":
                    return
            except (OSError, RuntimeError):
                pass
            if self.process.poll() is not None:
                self.stop()
                with open(os.path.join(self.directory, "redis.log"), errors="replace") as log:
                    if "Address already in use" in log.read():
                        raise _PortTaken()
                raise RuntimeError(f"redis-server exited; see {self.directory}/redis.log")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")
            time.sleep(0.02)

    def command(self, *args):
        """Send one command (authenticating first if needed) and return its decoded reply."""
        return self._exchange(self._connect(), args)

    def _exchange(self, connection, args):
        with connection as s, s.makefile("rb") as f:
            commands = [("AUTH", self.password)] if self.password else []
            s.sendall(b"".join(_encode(*c) for c in commands + [args]))
            for _ in commands:
                _read_reply(f)
            return _read_reply(f)

    def _connect_control(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(self._control_path)
        except OSError:
            s.close()
            raise
        return s

    def _connect(self):
        s = socket.create_connection((self.host, self.port), timeout=5)
        if self.tls:
            return ssl.create_default_context(cafile=self.certificate_path).wrap_socket(s, server_hostname=self.host)
        return s

    def info(self, section):
        """``INFO section`` as a dict of its ``name:value`` lines (values as strings)."""
        lines = self.command("INFO", section).decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def stop(self):
        """Stop the server (it writes its append-only file first, if persistent) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self):
        """Stop, then start again on the same port and directory (data survives only if ``persistent``)."""
        self.stop()
        self._launch()


class RedisServerMixin:
    """For trial test cases: ``start_redis(**options)`` starts a ``RedisServer`` that the test's cleanup stops."""

    def start_redis(self, **options):
        if not os.access(EXECUTABLE, os.X_OK):
            raise SkipTest("redis-server is not installed (scripts/test.sh installs it)")
        # Not under _trial_temp: a unix socket path must stay short.
        directory = tempfile.mkdtemp(prefix="mterelay-redis-")
        self.addCleanup(shutil.rmtree, directory, True)
        server = RedisServer.start(directory, **options)
        self.addCleanup(server.stop)
        return server
