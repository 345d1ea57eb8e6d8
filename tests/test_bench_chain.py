"""
The benchmark harness's own logic (bench/chainlib): reading wrk's result line, the table maths and targets, the fast
upstream's request framing, and the command line. Nothing here starts a process or a load.
"""

import json

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from bench.chainlib import cli, report, wrk
from bench.chainlib.targets import Control, Endpoint, IChain, ProxyChain, RelayChain
from bench.chainlib.upstream import Answers, Malformed, RequestFramer, RequestSeen, UpstreamProtocol, response_body


def summary(requests=1000, duration_us=10_000_000, p50=2000, p90=4000, p99=9000, status=0):
    """A done() line's JSON as chain.lua prints it (latencies in microseconds)."""
    return {
        "duration_us": duration_us,
        "requests": requests,
        "bytes": requests * 1100,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": status, "timeout": 0},
        "latency_us": {"min": 100, "mean": p50 * 1.1, "max": p99 * 2, "stdev": 10.0, "p50": p50, "p90": p90,
                       "p99": p99},
        "think_ms": [500, 1500],
    }


def result(connections=100, **fields):
    return wrk.from_summary(summary(**fields), connections)


class WrkOutputTests(SynchronousTestCase):
    """Reading the result line chain.lua's done() hook prints among wrk's own output."""

    def test_result_line_found_among_wrk_output(self):
        """The BENCH_JSON line is found after wrk's human summary and converted to ms and req/s."""
        data = summary(requests=2500, duration_us=5_000_000, p50=1500, p90=2500, p99=7250)
        output = (
            b"Running 5s test @ http://127.0.0.1:1/bench\n  2 threads and 100 connections\n"
            b"Requests/sec:    500.00\n" + wrk.MARKER + json.dumps(data).encode() + b"\n"
        )
        parsed = wrk.parse_output(output, connections=100)
        self.assertEqual((parsed.connections, parsed.requests), (100, 2500))
        self.assertAlmostEqual(parsed.rps, 2500 / 5.0)
        self.assertEqual((parsed.p50_ms, parsed.p90_ms, parsed.p99_ms), (1.5, 2.5, 7.25))
        self.assertEqual(parsed.errors.total, 0)

    def test_missing_result_line_is_an_error(self):
        """wrk output without the result line (the script failed) raises WrkError naming what wrk said."""
        error = self.assertRaises(wrk.WrkError, wrk.parse_output, b"unable to connect to 127.0.0.1:1\n", 100)
        self.assertIn("unable to connect", str(error))

    def test_malformed_result_line_is_an_error(self):
        """A truncated result line raises WrkError instead of a JSON traceback."""
        self.assertRaises(wrk.WrkError, wrk.parse_output, wrk.MARKER + b'{"requests": 1', 100)

    def test_error_counters_add_up(self):
        """Every kind of wrk error counts in the total that marks a run as failed."""
        errors = wrk.Errors(connect=1, read=2, write=3, status=4, timeout=5)
        self.assertEqual(errors.total, 15)

    def test_headers_and_think_time_travel_in_the_environment(self):
        """Headers (which may hold a token) go to chain.lua through the environment, not wrk's argv."""
        load = wrk.Load(connections=200, duration_s=7, think_ms=(400, 900), seed=3)
        env = wrk.environment(load, [("x-mte-outbound-token", "tok"), ("x-mte-upstream", "http://127.0.0.1:9")])
        argv = wrk.command(load, "http://127.0.0.1:8/bench")
        self.assertEqual(env["BENCH_HEADERS"].splitlines(), ["x-mte-outbound-token: tok", "x-mte-upstream: http://127.0.0.1:9"])
        self.assertEqual((env["BENCH_THINK_MIN_MS"], env["BENCH_THINK_MAX_MS"], env["BENCH_SEED"]), ("400", "900", "3"))
        self.assertNotIn("tok", " ".join(argv))
        self.assertIn("-c200", argv)
        self.assertIn("-d7s", argv)
        self.assertTrue(wrk.SCRIPT.is_file())


class ReportTests(SynchronousTestCase):
    """The product's Result row (ratios and differences) and issue 7's targets."""

    def test_rounds_combined(self):
        """Rounds of one chain add up to one result: requests and time summed (req/s of all rounds together),
        errors summed, latency percentiles the median of the rounds', the maximum the largest."""
        rounds = [
            wrk.from_summary(summary(requests=r, p50=p, status=s), 100)
            for r, p, s in ((1000, 2000, 0), (1200, 3000, 1), (800, 9000, 0))
        ]
        combined = wrk.combine(rounds)
        self.assertEqual((combined.requests, combined.duration_s, combined.errors.total), (3000, 30.0, 1))
        self.assertEqual(combined.rps, 100.0)
        self.assertEqual(combined.p50_ms, 3.0)
        self.assertEqual(combined.max_ms, max(r.max_ms for r in rounds))
        self.assertIs(wrk.combine(rounds[:1]), rounds[0])

    def test_ratios_and_differences(self):
        """The Result row is candidate / baseline for counts and candidate - baseline for latencies."""
        baseline = result(requests=1000, p50=2000, p90=4000, p99=9000)
        candidate = result(requests=950, p50=3500, p90=4500, p99=20000)
        comparison = report.Comparison(baseline, candidate)
        self.assertAlmostEqual(comparison.requests_ratio, 950 / 1000)
        self.assertAlmostEqual(comparison.rps_ratio, candidate.rps / baseline.rps)
        self.assertAlmostEqual(comparison.p50_diff_ms, 1.5)
        self.assertAlmostEqual(comparison.p90_diff_ms, 0.5)
        self.assertAlmostEqual(comparison.p99_diff_ms, 11.0)

    def test_zero_baseline_gives_zero_ratio(self):
        """A baseline that served nothing gives a 0 ratio, not a ZeroDivisionError."""
        comparison = report.Comparison(result(requests=0), result(requests=10))
        self.assertEqual(comparison.requests_ratio, 0.0)

    def test_targets_met(self):
        """A candidate within every bound misses nothing."""
        comparison = report.Comparison(result(requests=1000, p50=2000, p99=9000), result(requests=995, p50=6000,
                                                                                          p99=38000))
        self.assertEqual(comparison.failures(report.THINK_TARGETS), [])

    def test_each_target_can_be_missed(self):
        """Throughput under 99%, p50 over +5 ms and p99 over +30 ms are each reported."""
        comparison = report.Comparison(result(requests=1000, p50=2000, p99=9000), result(requests=980, p50=7100,
                                                                                          p99=39100))
        missed = comparison.failures(report.THINK_TARGETS)
        self.assertEqual([phrase.split()[0] for phrase in missed], ["req/s", "p50", "p99"])

    def test_errors_always_miss(self):
        """A run with errors misses its targets even when its figures look good."""
        comparison = report.Comparison(result(), result(status=3))
        self.assertEqual(comparison.failures(report.SATURATION_TARGETS), ["errors"])

    def test_saturation_ignores_latency(self):
        """Saturation only bounds throughput (85% of the plain proxy chain)."""
        baseline = result(requests=1000, p50=1000, p99=1000)
        self.assertEqual(report.Comparison(baseline, result(requests=860, p50=90000, p99=90000)).failures(
            report.SATURATION_TARGETS), [])
        self.assertEqual(len(report.Comparison(baseline, result(requests=840)).failures(report.SATURATION_TARGETS)), 1)

    def test_compare_pairs_levels(self):
        """Runs are paired by connections; a level only one side has is left out."""
        baseline = [result(connections=100), result(connections=200)]
        candidate = [result(connections=200, requests=5), result(connections=300)]
        compared = report.compare(baseline, candidate)
        self.assertEqual([(c.connections, c.candidate.requests) for c in compared], [(200, 5)])

    def test_table_rows(self):
        """A level prints both measured rows, the Result row, the product's row and the verdict."""
        comparison = report.Comparison(result(connections=300, requests=1000), result(connections=300, requests=900))
        text = report.render_level(comparison, "control", "relay-memory", "5 s", report.THINK_TARGETS)
        lines = text.splitlines()
        self.assertTrue(lines[0].startswith("300 concurrent connections"))
        self.assertEqual([line.split()[0] for line in lines[2:6]], ["control", "relay-memory", "Result", "Product"])
        self.assertIn("90.0%", lines[4])
        self.assertIn(f"{report.PRODUCT_RESULTS[300][0]:.1f}%", lines[5])
        self.assertTrue(lines[6].startswith("Targets: MISSED"))

    def test_saturation_table_has_no_product_row(self):
        """The product published no saturation figures, so none is shown there."""
        comparison = report.Comparison(result(connections=300), result(connections=300))
        text = report.render_level(comparison, "proxy", "relay-memory", "5 s", report.SATURATION_TARGETS)
        self.assertNotIn("Product", text)
        self.assertTrue(text.endswith("Targets: met"))


class FramerTests(SynchronousTestCase):
    """The fast upstream's request framing."""

    def test_content_length(self):
        """A Content-Length body completes the request once all its bytes arrived."""
        framer = RequestFramer()
        self.assertEqual(framer.feed(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"), [])
        self.assertEqual(framer.feed(b"cde"), [RequestSeen(b"POST", b"/a", 5, True)])

    def test_chunked_byte_by_byte(self):
        """A chunked body with an extension and a trailer, fed one byte at a time, is framed with its real size."""
        message = (
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        framer = RequestFramer()
        seen = [request for index in range(len(message)) for request in framer.feed(message[index : index + 1])]
        self.assertEqual(seen, [RequestSeen(b"POST", b"/c", 19, True)])

    def test_pipelined_requests(self):
        """Two requests in one read are both framed, in order."""
        framer = RequestFramer()
        seen = framer.feed(
            b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nz"
        )
        self.assertEqual([(r.target, r.body_bytes, r.keep_alive) for r in seen], [(b"/1", 0, True), (b"/2", 1, False)])

    def test_http10_keep_alive(self):
        """HTTP/1.0 closes unless it asks for keep-alive."""
        framer = RequestFramer()
        seen = framer.feed(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        self.assertEqual([request.keep_alive for request in seen], [False, True])

    def test_malformed_input(self):
        """Bad framing ends the list with a Malformed and the framer ignores anything after it."""
        for garbage in (b"NONSENSE\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            framer = RequestFramer()
            seen = framer.feed(garbage)
            self.assertIsInstance(seen[-1], Malformed, garbage)
            self.assertEqual(framer.feed(b"GET / HTTP/1.1\r\n\r\n"), [])

    def test_head_size_is_bounded(self):
        """A head that never ends is refused once it passes the bound instead of growing the buffer."""
        framer = RequestFramer()
        seen = framer.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        self.assertIsInstance(seen[-1], Malformed)


class UpstreamProtocolTests(SynchronousTestCase):
    """The fast upstream's answers."""

    def connect(self, expect_bytes=1024):
        protocol = UpstreamProtocol(Answers.build(1024, expect_bytes))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_answers_the_fixed_body(self):
        """A request with the expected body size gets 200 and the binary body."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(body, response_body(1024))
        self.assertFalse(transport.disconnecting)

    def test_wrong_body_size_is_a_400(self):
        """A chain that changes the request body size gets a 400 with the error table's JSON."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400"))
        self.assertEqual(json.loads(body)["code"], 400)

    def test_close_and_garbage_close_the_connection(self):
        """Connection: close and unframeable bytes both close after the answer."""
        for data, status in ((b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"200"), (b"BAD\r\n\r\n", b"400")):
            protocol, transport = self.connect(expect_bytes=None)
            protocol.dataReceived(data)
            self.assertIn(status, transport.value().split(b"\r\n", 1)[0])
            self.assertTrue(transport.disconnecting)


class ChainAndCommandLineTests(SynchronousTestCase):
    """The chains' interface and the command line's rules."""

    def test_chains_provide_ichain(self):
        """Control, the proxy chain and the relay chain all provide IChain."""
        for chain in (Control(), ProxyChain(), RelayChain("memory"), RelayChain("redis", "redis://127.0.0.1:1")):
            self.assertTrue(verifyObject(IChain, chain))
        self.assertEqual(RelayChain("redis", "redis://127.0.0.1:1").name, "relay-redis")

    def test_endpoint_repr_hides_headers(self):
        """An endpoint's token-bearing headers never appear in its repr."""
        self.assertNotIn("secret-token", repr(Endpoint("http://127.0.0.1:1/", (("x-mte-outbound-token", "secret-token"),))))

    def test_defaults(self):
        """By default the relay (memory, redis) is measured against the control at the product's four levels."""
        options = cli.parse_args([])
        self.assertEqual((options.baseline, options.chains), ("control", ["relay-memory", "relay-redis"]))
        self.assertEqual((options.connections, options.duration, options.think_ms), ([100, 200, 250, 300], 60,
                                                                                     (500, 1500)))

    def test_saturation(self):
        """--saturate drops the think time and makes the plain proxy chain the baseline."""
        options = cli.parse_args(["--saturate", "--chains", "proxy,relay-memory"])
        self.assertEqual((options.baseline, options.chains, options.think_ms), ("proxy", ["relay-memory"], (0, 0)))

    def test_rounds(self):
        """--rounds splits --duration into alternating rounds: one by default, never more than the seconds, never 0."""
        self.assertEqual(cli.parse_args([]).rounds, 1)
        self.assertEqual(cli.parse_args(["--duration", "30", "--rounds", "3"]).rounds, 3)
        for rounds in ("0", "61"):
            self.assertRaises(SystemExit, cli.parse_args, ["--rounds", rounds])

    def test_bad_levels_are_refused(self):
        """Connection counts wrk cannot split evenly over its threads are refused with a usage error."""
        for levels in ("101", "0", "1", "abc"):
            self.assertRaises(SystemExit, cli.parse_args, ["--connections", levels])
