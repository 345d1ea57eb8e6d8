"""
``bash scripts/run.sh`` as a developer runs it: its demo upstream only when no upstream is given and only on a port of
its own, the caller's working directory kept, and nothing left running once it is stopped or fails.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from tests.redis_server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "scripts", "run.sh")
SECRET = "s" * 40
#: The relay's settings (and the demo's port) a test sets itself, never inherited from the environment running it.
SETTINGS = ("UPSTREAM", "CLIENT_ID_SECRET", "PORT", "LISTEN", "PASS_THROUGH_ROUTES", "DEMO_UPSTREAM_PORT", "HEADERS")


def accepts(port):
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def get(url, timeout=5):
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _outcome(url):
    """``get(url, timeout=10)``, or the OSError it raised."""
    try:
        return get(url, timeout=10)
    except OSError as e:
        return e


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path.startswith("/slower"):
            time.sleep(8)
        elif self.path.startswith("/slow"):
            time.sleep(1.5)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:
            pass  # the relay broke the request off (a drain cut short)

    def log_message(self, *args):
        pass


class RunScriptTests(SynchronousTestCase):
    def upstream(self):
        """A plain HTTP upstream in a thread of this process; its ``paths`` lists the paths it was asked for."""
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
        server.daemon_threads = True
        server.paths = []
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    def start(self, args=(), cwd=ROOT, **environ):
        """
        Start ``bash scripts/run.sh`` with ``args`` in ``cwd``, in its own process group and with a terminal's default
        SIGINT, in our environment less the relay's settings plus ``environ``. Returns the process; its output goes to
        ``process.log_path``. The cleanup kills the whole group: the relay stays in it even when run.sh is gone.
        """
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        env.update(environ)
        log_path = os.path.abspath(self.mktemp())
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                ["bash", RUN, *args], cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        process.log_path = log_path
        self.addCleanup(self.kill_group, process)
        return process

    def kill_group(self, process):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)

    def output(self, process):
        with open(process.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_served(self, process, port):
        """Wait (at most 10 s) until the relay answers the echo route on ``port``; returns run.sh's output so far."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads(get(f"http://127.0.0.1:{port}/api/mte-echo/hi", timeout=2)[1])["echo"] == "hi":
                    return self.output(process)
            except (OSError, ValueError):
                time.sleep(0.1)
        self.fail(f"run.sh did not serve the echo route on {port}: {self.output(process)[-2000:]}")

    def assertGroupGone(self, process):
        """Nothing is left of run.sh's process group (the relay, the demo) within 5 s."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        listing = subprocess.run(["ps", "-eo", "pid,pgid,stat,args"], capture_output=True, text=True).stdout
        left = [line for line in listing.splitlines() if line.split()[1] == str(process.pid)]
        self.fail(f"processes of run.sh's group still running: {left}")

    def test_busy_demo_port_stops_at_once(self):
        """When something else listens on DEMO_UPSTREAM_PORT, run.sh exits non-zero at once with one line naming the
        port, and starts no relay that would pass /demo/* to that foreign server."""
        foreign = socket.socket()
        self.addCleanup(foreign.close)
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(5)
        demo_port = foreign.getsockname()[1]
        port = free_port()
        process = self.start(PORT=str(port), DEMO_UPSTREAM_PORT=str(demo_port))
        started = time.monotonic()
        self.assertNotEqual(process.wait(15), 0)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn(f"run.sh: error: port {demo_port} is in use", self.output(process))
        self.assertFalse(accepts(port))
        self.assertGroupGone(process)

    def test_demo_that_cannot_listen_stops_run(self):
        """When the demo upstream cannot listen (its port bound by another socket that does not accept), run.sh
        exits non-zero with one line of its own after the demo's error, and no relay is left."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        demo_port = taken.getsockname()[1]
        port = free_port()
        process = self.start(PORT=str(port), DEMO_UPSTREAM_PORT=str(demo_port))
        self.assertNotEqual(process.wait(15), 0)
        output = self.output(process)
        self.assertIn(f"run.sh: error: the demo upstream did not start on port {demo_port}", output)
        self.assertNotIn("mterelay on port", output)
        self.assertGroupGone(process)

    def test_upstream_flag_means_no_demo(self):
        """--upstream URL and --upstream=URL as flags (with --port and --port=) start no demo upstream and pass no
        /demo/* through to the real upstream; the banner names the flag's port and upstream."""
        server, url = self.upstream()
        for spelled_apart in (True, False):
            port, demo_port = free_port(), free_port()
            if spelled_apart:
                args = ["--upstream", url, "--port", str(port)]
            else:
                args = [f"--upstream={url}", f"--port={port}"]
            process = self.start(args, PORT=str(free_port()), DEMO_UPSTREAM_PORT=str(demo_port))
            output = self.wait_served(process, port)
            self.assertIn(f"mterelay on port {port}, upstream {url}; try: curl http://127.0.0.1:{port}/api/mte-echo/hi",
                          output)
            status, _ = get(f"http://127.0.0.1:{port}/demo/x")
            self.assertNotEqual(status, 200)
            self.assertEqual(server.paths, [])
            self.assertFalse(accepts(demo_port))
            self.assertNotIn("demo upstream", output)
            process.terminate()
            process.wait(15)

    def test_upstream_timeout_flag_keeps_the_demo(self):
        """--upstream-timeout is another option than --upstream: with it alone the demo upstream still serves
        /demo/*, and the banner names PORT."""
        port, demo_port = free_port(), free_port()
        process = self.start(["--upstream-timeout", "5"], PORT=str(port), DEMO_UPSTREAM_PORT=str(demo_port))
        output = self.wait_served(process, port)
        self.assertIn(f"mterelay on port {port}, upstream http://127.0.0.1:{demo_port};", output)
        status, body = get(f"http://127.0.0.1:{port}/demo/x")
        self.assertEqual((status, json.loads(body)["upstream"]), (200, "mterelay demo"))

    def test_term_to_the_script_stops_everything(self):
        """SIGTERM to run.sh's own pid (not its group) stops the relay and the demo: both ports stop accepting,
        run.sh exits with the relay's status (twistd's on SIGTERM) and leaves no process behind."""
        port, demo_port = free_port(), free_port()
        process = self.start(PORT=str(port), DEMO_UPSTREAM_PORT=str(demo_port))
        self.wait_served(process, port)
        os.kill(process.pid, signal.SIGTERM)
        self.assertEqual(process.wait(15), 128 + signal.SIGTERM)
        self.assertFalse(accepts(port))
        self.assertFalse(accepts(demo_port))
        self.assertGroupGone(process)

    def test_ctrl_c_stops_everything(self):
        """A terminal's Ctrl-C (SIGINT to the whole foreground group) stops the relay, although a background job
        ignores SIGINT, and the demo; nothing is left behind."""
        port, demo_port = free_port(), free_port()
        process = self.start(PORT=str(port), DEMO_UPSTREAM_PORT=str(demo_port))
        self.wait_served(process, port)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(15)
        self.assertFalse(accepts(port))
        self.assertFalse(accepts(demo_port))
        self.assertGroupGone(process)

    def test_stop_waits_for_the_drain(self):
        """On SIGTERM run.sh waits while the relay drains: a request in flight still gets its answer, and run.sh
        exits only after it."""
        self.assert_drains(lambda process: os.kill(process.pid, signal.SIGTERM))

    def test_closed_terminal_drains_too(self):
        """Closing the terminal (SIGHUP to the whole group) drains the relay like a Ctrl-C, instead of killing it
        with the request in flight (twistd does not handle SIGHUP: the relay must not get it)."""
        self.assert_drains(lambda process: os.killpg(process.pid, signal.SIGHUP))

    def test_term_to_the_whole_group_drains_quietly(self):
        """A TERM to run.sh's whole group reaches the relay twice (from the kill, and from run.sh passing it on): the
        relay still drains, the request in flight gets its answer, and the second TERM is only logged, without
        the stopping reactor's ReactorNotRunning traceback."""
        self.assert_drains(lambda process: os.killpg(process.pid, signal.SIGTERM))

    def test_second_ctrl_c_breaks_the_drain_off(self):
        """Run on a --config file, run.sh becomes twistd itself, which gets a terminal's Ctrl-C: the first one starts
        the drain, a second one breaks it off at once (the client in flight sees its connection broken, not an
        answer), with one line saying so and no traceback."""
        server, url = self.upstream()
        port = free_port()
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        with open(os.path.join(cwd, "relay.yaml"), "w", encoding="utf-8") as f:
            f.write(f"upstream: {url}\nclientIdSecret: {SECRET}\nport: {port}\npassThroughRoutes: [/slower]\n")
        process = self.start(["--config", "relay.yaml"], cwd=cwd)
        self.wait_served(process, port)
        answers = self.request_in_flight(server, f"http://127.0.0.1:{port}/slower")
        os.killpg(process.pid, signal.SIGINT)
        self.wait_logged(process, "draining 1 in-flight requests")
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        process.wait(15)
        self.assertLess(time.monotonic() - started, 5)
        output = self.output(process)
        self.assertIn("drain broken off with 1 requests in flight", output)
        self.assertNotIn("Traceback", output)
        answers.join(10)
        self.assertEqual(len(answers.results), 1)
        self.assertIsInstance(answers.results[0], OSError)
        self.assertGroupGone(process)

    def request_in_flight(self, server, url):
        """A GET of ``url`` in a thread, once the upstream has it; the thread's ``results`` gets (status, body) or the
        OSError it failed with."""
        thread = threading.Thread(target=lambda: thread.results.append(_outcome(url)))
        thread.results = []
        thread.start()
        self.addCleanup(thread.join, 10)
        deadline = time.monotonic() + 5
        while not server.paths and time.monotonic() < deadline:
            time.sleep(0.05)
        return thread

    def wait_logged(self, process, text):
        """Wait (at most 10 s) until ``text`` is in the output."""
        deadline = time.monotonic() + 10
        while text not in self.output(process):
            self.assertLess(time.monotonic(), deadline, self.output(process)[-2000:])
            time.sleep(0.05)

    def assert_drains(self, stop):
        server, url = self.upstream()
        port = free_port()
        process = self.start(UPSTREAM=url, PASS_THROUGH_ROUTES="/slow", PORT=str(port))
        self.wait_served(process, port)
        answers = self.request_in_flight(server, f"http://127.0.0.1:{port}/slow")
        stop(process)
        process.wait(15)
        answers.join(10)
        self.assertEqual(answers.results, [(200, b'{"path": "/slow"}')])
        output = self.output(process)
        self.assertIn("draining 1 in-flight requests", output)
        self.assertNotIn("Traceback", output)
        self.assertGroupGone(process)

    def test_configuration_error_is_the_exit_status(self):
        """A configuration error makes run.sh exit 2, the relay's status (systemd and scripts tell it from a crash),
        and stops the demo upstream it had started."""
        demo_port = free_port()
        process = self.start(PORT=str(free_port()), DEMO_UPSTREAM_PORT=str(demo_port), HEADERS="{not json")
        self.assertEqual(process.wait(15), 2)
        self.assertIn("mterelay: error: HEADERS (environment): not a JSON object", self.output(process))
        self.assertFalse(accepts(demo_port))
        self.assertGroupGone(process)

    def test_relative_config_from_another_directory(self):
        """bash /path/to/scripts/run.sh --config relay.yaml, run from the file's directory, reads that file, and
        the relative identity key path in it, from the caller's directory."""
        from mterelay.keygen import write_identity

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        write_identity(os.path.join(cwd, "identity.pem"))
        port = free_port()
        with open(os.path.join(cwd, "relay.yaml"), "w", encoding="utf-8") as f:
            f.write(f"upstream: http://file.example\nclientIdSecret: {SECRET}\nport: {port}\n"
                    "identityKey: identity.pem\n")
        process = self.start(["--config", "relay.yaml"], cwd=cwd)
        output = self.wait_served(process, port)
        self.assertIn(f"mterelay serving tcp:{port}:backlog=1024 for upstream http://file.example", output)
        self.assertNotIn("ephemeral identity key", output)


class DeployEnvironmentFileTests(SynchronousTestCase):
    def test_secrets_ship_empty(self):
        """deploy/'s environment files name CLIENT_ID_SECRET and OUTBOUND_TOKEN with empty values, never a
        placeholder the relay would accept as a publicly known secret, and say how to generate one."""
        for name in ("mterelay.env.minimal", "mterelay.env.full"):
            with open(os.path.join(ROOT, "deploy", name), encoding="utf-8") as f:
                text = f.read()
            values = dict(line.partition("=")[::2] for line in text.splitlines() if line and line[0] != "#")
            self.assertEqual(values["CLIENT_ID_SECRET"], "", name)
            self.assertEqual(values.get("OUTBOUND_TOKEN", ""), "", name)
            self.assertNotIn("CHANGE-ME", text, name)
            self.assertIn("secrets.token_urlsafe(32)", text, name)
