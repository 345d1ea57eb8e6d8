"""Tests for mterelay.tap: option parsing, one-line configuration errors and service wiring."""

import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, Logger, LogPublisher, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mterelay import gctuning, logs, tap, web
from mterelay.redis_registry import RedisRegistry
from mterelay.registry import MemoryRegistry
from tests.redis_server import free_port, self_signed_certificate

SECRET = "s" * 40
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"UPSTREAM": "http://127.0.0.1:9", "CLIENT_ID_SECRET": SECRET}


def parse(argv, environ=ENV):
    """Parse ``argv`` as ``twistd mterelay`` would; returns (options, stderr text)."""
    stderr = io.StringIO()
    options = tap.Options(environ=environ, stderr=stderr, reactor=MemoryReactor())
    options.parseOptions(argv)
    return options, stderr.getvalue()


def refuse(argv, environ=ENV):
    """Parse ``argv`` as ``twistd mterelay`` would, expecting it to exit; returns (exit status, stderr text)."""
    stderr = io.StringIO()
    try:
        tap.Options(environ=environ, stderr=stderr, reactor=MemoryReactor()).parseOptions(argv)
    except SystemExit as e:
        return e.code, stderr.getvalue()
    raise AssertionError(f"accepted: {argv}")


class OptionsTests(SynchronousTestCase):
    def test_flags_build_settings(self):
        """Flags reach the Settings and --listen is repeatable."""
        options, _ = parse(["--listen", "tcp:0", "--listen", "tcp:1", "--debug", "--mte-routes", "/api/*"])
        self.assertEqual(options.settings.listen, ("tcp:0", "tcp:1"))
        self.assertTrue(options.settings.debug)
        self.assertEqual(options.settings.mte_routes, ("/api/*",))

    def test_repr_names_options_only(self):
        """The parsed command line's repr names the options given, never their values: CLIENT_ID_SECRET and
        OUTBOUND_TOKEN given as flags would otherwise show in any log or traceback that prints it."""
        token = "t" * 40
        argv = ["--client-id-secret", SECRET, "--outbound-token", token, "--debug"]
        options, _ = parse(argv, {"UPSTREAM": "http://a"})
        text = repr(options)
        self.assertNotIn(SECRET, text)
        self.assertNotIn(token, text)
        self.assertIn("client-id-secret", text)

    def test_start_line_shows_no_upstream_path(self):
        """The start-up line names the upstream's origin only: a path can hold a token (as config errors say); another
        names the relay's public identity key, what clients and peers pin."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options, _ = parse(["--listen", "tcp:0"], dict(ENV, UPSTREAM="http://api.example/key-123/v1"))
        tap.makeService(options)
        [line] = [formatEvent(e) for e in events if "serving" in formatEvent(e)]
        self.assertTrue(line.endswith("for upstream http://api.example/..."), line)
        # The public key to pin is said at start (for an IDENTITY_KEY file nothing else shows it).
        [line] = [formatEvent(e) for e in events if "relay identity" in formatEvent(e)]
        self.assertIn(options.identity.public_b64(), line)

    def test_bad_value_exits_with_one_line(self):
        """An invalid setting exits with status 2 and a single 'mterelay: error:' line naming the source."""
        self.assertEqual(
            refuse([], dict(ENV, UPSTREAM="ftp://x")),
            (2, "mterelay: error: UPSTREAM (environment): not an http(s) URL: 'ftp://x'\n"),
        )

    def test_unknown_option_exits_with_one_line(self):
        """An unknown option, or a value given to a flag, exits with status 2 and one line (not twistd's usage text and
        status 1)."""
        for argv, message in (
            (["--bogus"], "option --bogus not recognized"),
            (["--debug=1"], "option --debug must not have an argument"),
        ):
            code, stderr = refuse(argv)
            self.assertEqual(code, 2)
            self.assertEqual(stderr, f"mterelay: error: {message} (twistd mterelay --help lists the options)\n")

    def test_bad_endpoint(self):
        """An endpoint string Twisted cannot parse is a configuration error naming its source, not a traceback."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write("listen:\n- tcp:0\n- nosuch:3\n")
        for argv, environ, source in (
            (["--listen", "nosuch:1"], ENV, "--listen (flag)"),
            ([], dict(ENV, LISTEN="tcp:0,nosuch:2"), "LISTEN (environment)"),
            (["--config", path], ENV, f"listen (file {path})"),
        ):
            code, stderr = refuse(argv, environ)
            self.assertEqual(code, 2)
            self.assertTrue(stderr.startswith(f"mterelay: error: {source}: invalid endpoint 'nosuch:"), stderr)
            self.assertEqual(len(stderr.splitlines()), 1)

    def test_endpoint_port_out_of_range(self):
        """An endpoint's port outside 0-65535, under any wrapper, is a configuration error: listening on it would end
        twistd with an OverflowError traceback and exit status 1, which systemd restarts forever."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key, certificate = self_signed_certificate(directory)
        pems = os.path.join(directory, "pems")
        os.makedirs(pems)
        for description, port in (
            ("tcp:99999", 99999),
            ("tcp:-1", -1),
            ("tcp6:port=70000", 70000),
            (f"ssl:65536:privateKey={key}:certKey={certificate}", 65536),
            (f"tls:{pems}:port=70000", 70000),
            ("haproxy:tcp:99999:interface=127.0.0.1", 99999),
        ):
            expected = f"--listen (flag): invalid endpoint {description!r}: port {port} is not 0-65535"
            self.assertEqual(refuse(["--listen", description]), (2, f"mterelay: error: {expected}\n"))
        options, _ = parse(["--listen", "tcp:65535", "--listen", f"ssl:0:privateKey={key}:certKey={certificate}"])
        self.assertEqual(len(options.settings.listen), 2)

    def test_help_lists_environment_and_defaults(self):
        """--help names every setting's environment variable and default."""
        text = str(tap.Options(environ=ENV))
        for name in ("UPSTREAM", "CLIENT_ID_SECRET", "PASS_THROUGH_ROUTES", "DRAIN_TIMEOUT", "default: 8080"):
            self.assertIn(name, " ".join(text.split()))


class MakeServiceTests(SynchronousTestCase):
    def test_wiring(self):
        """makeService builds a logging service around the collector settings, then the registry (memory without
        REDIS_URL) and a draining service with one listener per endpoint, stopped in that order."""
        options, _ = parse(["--listen", "tcp:0", "--listen", "tcp:0"])
        top = tap.makeService(options)
        self.assertIsInstance(top, logs.LoggingService)
        collector, lifetime = list(top)
        self.assertIsInstance(collector, gctuning.GCTuningService)
        self.assertIsInstance(lifetime, web.StopInOrder)
        registry, relay = list(lifetime)
        self.assertIsInstance(registry, MemoryRegistry)
        self.assertIsInstance(relay, web.DrainingService)
        listeners = list(relay)
        self.assertEqual(len(listeners), 2)
        self.assertTrue(all(isinstance(s, StreamServerEndpointService) for s in listeners))
        self.assertIs(listeners[0].factory, listeners[1].factory)


    def test_cannot_listen_stops_the_start_with_one_line(self):
        """
        An endpoint that cannot listen stops twistd (rather than running portless) with one line: status 1 for a
        port in use (systemd retries), 2 for a socket directory that does not exist (only the configuration helps).
        """
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        taken = f"tcp:{probe.getsockname()[1]}:interface=127.0.0.1"
        missing = f"unix:{os.path.abspath(self.mktemp())}/relay.sock"
        for description, status, reason in ((taken, 1, "Address already in use"), (missing, 2, "No such file")):
            stderr = io.StringIO()
            options = tap.Options(environ=ENV, stderr=stderr)  # the real reactor: a real bind that fails
            options.parseOptions(["--listen", description])
            _, lifetime = list(tap.makeService(options))
            _, relay = list(lifetime)
            with self.assertRaises(SystemExit) as caught:
                relay.privilegedStartService()
            self.assertEqual(caught.exception.code, status)
            # Also an Exception: what a daemonizing twistd reports to the process that launched it.
            self.assertIsInstance(caught.exception, Exception)
            line = stderr.getvalue()
            self.assertTrue(line.startswith(f"mterelay: error: cannot listen on {description!r}: "), line)
            self.assertIn(reason, line)
            self.assertEqual(len(line.splitlines()), 1)


class GCTuningTests(SynchronousTestCase):
    def test_freezes_start_up_heap_and_restores(self):
        """Starting the service freezes what exists and raises the thresholds; stopping puts both back."""
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        service = gctuning.GCTuningService((12345, 7, 8))
        service.startService()
        self.assertEqual(gc.get_threshold(), (12345, 7, 8))
        self.assertGreater(gc.get_freeze_count(), 1000)
        service.stopService()
        self.assertEqual(gc.get_threshold(), before)
        self.assertEqual(gc.get_freeze_count(), 0)


class RegistryWiringTests(SynchronousTestCase):
    def test_redis_url_selects_redis_registry(self):
        """REDIS_URL selects the Redis registry with the configured timeout and pair limits."""
        options, _ = parse(["--redis-url", "redis://127.0.0.1:9/2", "--redis-timeout", "0.5", "--pair-ttl", "60"])
        registry, _ = list(list(tap.makeService(options))[1])
        self.assertIsInstance(registry, RedisRegistry)
        self.assertEqual((registry.timeout, registry.pair_ttl), (0.5, 60))

    def test_identity_key_loaded_or_refused(self):
        """IDENTITY_KEY loads the relay's key; an unreadable or non-Ed25519 file is a one-line configuration error
        naming where the path came from."""
        from mterelay.keygen import write_identity

        path = self.mktemp()
        identity = write_identity(path)
        options, _ = parse(["--identity-key", path])
        self.assertEqual(options.identity.public_bytes(), identity.public_bytes())
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("not a key")
        for argv, environ, source in (
            (["--identity-key", bad], ENV, "--identity-key (flag)"),
            ([], dict(ENV, IDENTITY_KEY=bad), "IDENTITY_KEY (environment)"),
        ):
            code, stderr = refuse(argv, environ)
            self.assertEqual(code, 2)
            self.assertTrue(stderr.startswith(f"mterelay: error: {source}: cannot load {bad!r}: "), stderr)
            self.assertEqual(len(stderr.splitlines()), 1)


class TwistdTests(SynchronousTestCase):
    """``twistd mterelay`` as an operator runs it, in a subprocess."""

    def run_twistd(self, args, environ):
        env = {k: v for k, v in os.environ.items() if k not in ("UPSTREAM", "CLIENT_ID_SECRET")}
        env.update(environ)
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "--nodaemon", "--pidfile=", "mterelay"] + args,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def assertOneLineError(self, result, expected):
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, f"mterelay: error: {expected}\n")
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_bad_configurations(self):
        """No upstream, a bad URL, an unknown YAML key and bad HEADERS JSON each exit 2 with one line."""
        self.assertOneLineError(
            self.run_twistd([], {"CLIENT_ID_SECRET": SECRET}),
            "UPSTREAM: required; set --upstream, UPSTREAM or upstream in the --config file",
        )
        self.assertOneLineError(
            self.run_twistd(["--upstream", "ftp://x"], {"CLIENT_ID_SECRET": SECRET}),
            "--upstream (flag): not an http(s) URL: 'ftp://x'",
        )
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("upstream: http://x\nbogusKey: 1\n")
        self.assertOneLineError(self.run_twistd(["--config", path], ENV), f"bogusKey (file {path}): unknown setting")
        result = self.run_twistd([], dict(ENV, HEADERS="{not json"))
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("mterelay: error: HEADERS (environment): not a JSON object"))
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_daemon_that_cannot_listen_says_so_and_exits(self):
        """twistd run as a daemon (no --nodaemon) on a port in use: the launching process exits 1 at once naming the
        cause, and the pid file is gone (it used to wait for its child for ever)."""
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = dict(os.environ, **ENV)
        pidfile = os.path.join(cwd, "twistd.pid")
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), f"--pidfile={pidfile}",
             f"--logfile={os.path.join(cwd, 'twistd.log')}", "mterelay",
             "--listen", f"tcp:{probe.getsockname()[1]}:interface=127.0.0.1"],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("ListenFailed: [Errno 98] Address already in use (listening on", result.stdout + result.stderr)
        self.assertFalse(os.path.exists(pidfile))

    def test_out_of_range_ports(self):
        """A PORT or LISTEN port beyond 65535 exits 2 with one line (not an OverflowError traceback and status 1,
        which systemd would restart forever)."""
        self.assertOneLineError(
            self.run_twistd([], dict(ENV, PORT="70000")), "PORT (environment): must be at most 65535"
        )
        self.assertOneLineError(
            self.run_twistd([], dict(ENV, LISTEN="tcp:99999")),
            "LISTEN (environment): invalid endpoint 'tcp:99999': port 99999 is not 0-65535",
        )


class DeployUnitTests(SynchronousTestCase):
    def test_unit_runs_twistd_hardened(self):
        """The systemd unit runs twistd in the foreground from an EnvironmentFile, hardened and restarted on failure."""
        path = os.path.join(ROOT, "deploy", "mterelay.service")
        with open(path, encoding="utf-8") as f:
            lines = {line.strip() for line in f if line.strip() and not line.startswith("#")}
        self.assertIn("ExecStart=/opt/mterelay/venv/bin/twistd --nodaemon --pidfile= mterelay", lines)
        for directive in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                          "Restart=on-failure", "EnvironmentFile=/etc/mterelay/mterelay.env"):
            self.assertIn(directive, lines)


class RunScriptTests(SynchronousTestCase):
    def serve(self, args, port, **environ):
        """
        Start ``bash scripts/run.sh`` with ``args``, in our environment less the relay's settings plus ``environ``,
        and wait until it serves the echo route on ``port``; returns what it has written so far.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("UPSTREAM", "CLIENT_ID_SECRET", "PORT", "LISTEN")}
        env.update(environ)
        log_path = os.path.abspath(self.mktemp())
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(["bash", "scripts/run.sh", *args], cwd=ROOT, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(process.wait, 20)
        self.addCleanup(os.killpg, process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        served = False
        while not served and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/mte-echo/hi", timeout=2) as answer:
                    served = json.loads(answer.read())["echo"] == "hi"
            except OSError:
                time.sleep(0.2)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            output = f.read()
        self.assertTrue(served, "run.sh did not serve the echo route: " + output[-2000:])
        return output

    def test_run_script_serves_echo(self):
        """bash scripts/run.sh (demo upstream, generated secret) serves /api/mte-echo/hi."""
        port = free_port()
        self.serve([], port, PORT=str(port), DEMO_UPSTREAM_PORT=str(free_port()))

    def test_run_script_leaves_a_config_file_alone(self):
        """With --config, run.sh exports none of its defaults (the demo UPSTREAM, a generated CLIENT_ID_SECRET,
        PASS_THROUGH_ROUTES): the environment outranks the file, so they would replace its values."""
        port = free_port()
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"upstream: http://file.example\nclientIdSecret: {SECRET}\nport: {port}\n")
        output = self.serve([f"--config={path}"], port)
        self.assertIn(f"mterelay serving tcp:{port}:backlog=1024 for upstream http://file.example", output)


class LoggingTests(SynchronousTestCase):
    def test_json_lines_and_level(self):
        """JSON format writes one object a line with the structured fields; DEBUG events pass only under DEBUG."""
        for debug in (False, True):
            out = io.StringIO()
            observer = logs.make_observer("json", debug, out)
            logger = Logger(observer=observer, namespace="test")
            logger.info("upstream {code}", code=502)
            logger.debug("detail {n}", n=1)
            lines = out.getvalue().splitlines()
            self.assertEqual(len(lines), 2 if debug else 1)
            event = json.loads(lines[0])
            self.assertEqual((event["code"], event["log_format"]), (502, "upstream {code}"))

    def test_service_offers_observer_to_twistd_application(self):
        """Under twistd the observer becomes the application's ILogObserver instead of a second observer."""
        observer = logs.make_observer("text", False, io.StringIO())
        application = Application("mterelay")
        service = logs.LoggingService(observer)
        service.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)

    def test_service_adds_observer_elsewhere(self):
        """Outside twistd the service adds its observer while it runs and removes it on stop."""
        publisher = LogPublisher()
        out = io.StringIO()
        service = logs.LoggingService(logs.make_observer("text", False, out), publisher)
        service.startService()
        Logger(observer=publisher).info("running")
        self.successResultOf(service.stopService())
        Logger(observer=publisher).info("stopped")
        self.assertIn("running", out.getvalue())
        self.assertNotIn("stopped", out.getvalue())

    def test_relay_logs_hold_no_secret(self):
        """A relay run with DEBUG on logs its warnings and requests but never the secrets it was given."""
        out = io.StringIO()
        options, _ = parse(["--listen", "tcp:0", "--debug", "--outbound-token", "outbound-token-value"],
                           dict(ENV, CLIENT_ID_SECRET="short-secret-value"))
        observer = logs.make_observer("json", True, out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        tap.makeService(options)
        text = out.getvalue()
        self.assertIn("CLIENT_ID_SECRET", text)
        self.assertNotIn("short-secret-value", text)
        self.assertNotIn("outbound-token-value", text)
