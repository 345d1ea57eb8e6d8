"""
The registry contract against a real redis-server, plus what only a shared registry must show: several instances on one
Redis, races between them, and a Redis restart.
"""

from twisted.internet import defer, reactor, task
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mterelay import redis_registry
from mterelay.redis_registry import RedisAddress, RedisRegistry
from mterelay.registry import PairLimitExceeded, RegistryUnavailable, UnknownPair
from tests.redis_server import RedisServerMixin
from tests.test_registry import STATE, RegistryContractMixin, pair


class SkewedClock:
    """The reactor's time ``offset`` seconds off, as on a host whose clock is wrong; its timers run on the reactor."""

    def __init__(self, offset):
        self.offset = offset

    def seconds(self):
        return reactor.seconds() + self.offset

    def callLater(self, delay, f, *args, **kwargs):
        return reactor.callLater(delay, f, *args, **kwargs)


class RedisTestMixin(RedisServerMixin):
    """Registries connected to this test's own redis-server, closed by the test's cleanup."""

    redis_options = {}

    def setUp(self):
        self.server = self.start_redis(**self.redis_options)

    def start(self, url=None, clock=reactor, **kwargs):
        """A registry started (connecting in the background), stopped by the test's cleanup."""
        registry = RedisRegistry.from_url(url or self.server.url, clock, reactor, **kwargs)
        registry.startService()
        self.addCleanup(registry.stopService)
        return registry

    async def connect(self, url=None, **kwargs):
        registry = self.start(url, **kwargs)
        await registry.whenConnected()
        return registry

    async def until(self, condition, seconds=5):
        """Wait for ``condition()`` to hold, checking every 0.05 s; fail after ``seconds``."""
        deadline = reactor.seconds() + seconds
        while not condition():
            if reactor.seconds() > deadline:
                self.fail(f"still not {condition} after {seconds} s")
            await task.deferLater(reactor, 0.05)


class RedisRegistryContractTests(RedisTestMixin, RegistryContractMixin, TestCase):
    """The contract against Redis, over TCP."""

    short_ttl = 1.5

    async def make_registry(self, **kwargs):
        return await self.connect(**kwargs)

    async def advance(self, seconds):
        await task.deferLater(reactor, seconds)


class RedisLimitTests(RedisTestMixin, TestCase):
    async def test_expired_pairs_behind_many_live_stale_hints_make_room(self):
        """
        At the relay-wide limit, expired pairs make room even when more than one batch of live pairs (used since
        their limit-set hint passed) sorts before them: creation re-checks further batches before it refuses.
        """
        ttl = 2.0
        # The client's set and the relay's set are each pruned by one batch first: over two batches of live pairs.
        registry = await self.connect(pair_ttl=ttl, max_pairs_per_client=1000, max_pairs_total=250)
        live = [f"pair-live-{i:04d}" for i in range(210)]
        for pair_id in live:
            await registry.create_pair(pair(pair_id=pair_id))
        await task.deferLater(reactor, 0.4)
        for i in range(40):
            await registry.create_pair(pair(pair_id=f"pair-gone-{i:04d}"))
        await task.deferLater(reactor, ttl - 1.4)  # a second to spare before the first live pair expires
        for pair_id in live:  # refreshes the keys' TTL, not their hints
            await registry.reserve_counters("client-a", pair_id)
        await task.deferLater(reactor, 1.6)  # the second group expired; every hint is stale
        await registry.create_pair(pair(pair_id="pair-new-0000"))
        self.assertEqual((await registry.get_client("client-a")).pair_count, 211)

    async def test_expiry_agreed_whatever_the_relays_clocks(self):
        """
        A relay whose clock runs ten minutes ahead creates a pair: it counts against the limit while it lives, and
        stops counting for a relay with the right time as soon as it expired (the limit sets go by Redis's clock).
        """
        ahead = await self.connect(clock=SkewedClock(600), pair_ttl=1, max_pairs_per_client=1)
        right = await self.connect(pair_ttl=1, max_pairs_per_client=1)
        await ahead.create_pair(pair(pair_id="p1"))
        with self.assertRaises(PairLimitExceeded):
            await right.create_pair(pair(pair_id="p2"))
        await task.deferLater(reactor, 1.5)
        await right.create_pair(pair(pair_id="p2"))
        self.assertEqual((await ahead.get_client("client-a")).pair_count, 1)


class RedisSharingTests(RedisTestMixin, TestCase):
    """Two registries on separate connections behave as one."""

    async def test_instances_share_pairs(self):
        """A pair created through one instance is read, swapped and deleted through another."""
        one, two = await self.connect(), await self.connect()
        await one.create_pair(pair(encode_type="MTE"))
        self.assertTrue(await two.swap_state("client-a", "pair-1", 0, b"next"))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).state, b"next")
        await two.delete_pair("client-a", "pair-1")
        with self.assertRaises(UnknownPair):
            await one.get_pair("client-a", "pair-1")

    async def test_reservations_across_instances(self):
        """2 x 500 concurrent reservations from two instances yield 1000 distinct counters."""
        one, two = await self.connect(), await self.connect()
        await one.create_pair(pair())
        counters = await defer.gatherResults(
            [r.reserve_counters("client-a", "pair-1") for _ in range(500) for r in (one, two)]
        )
        self.assertEqual(sorted(counters), list(range(1000)))

    async def test_replay_across_instances(self):
        """Each counter, marked concurrently through both instances, is fresh through exactly one of them."""
        one, two = await self.connect(), await self.connect()
        await one.create_pair(pair())
        marks = await defer.gatherResults(
            [r.mark_seen("client-a", "pair-1", c, 256) for c in range(100) for r in (one, two)]
        )
        self.assertEqual([marks[i] + marks[i + 1] for i in range(0, 200, 2)], [1] * 100)

    async def test_swap_race_one_winner(self):
        """Two instances racing to advance one ratchet version: exactly one wins, every round."""
        one, two = await self.connect(), await self.connect()
        await one.create_pair(pair(encode_type="MTE"))
        for version in range(20):
            wins = await defer.gatherResults(
                [one.swap_state("client-a", "pair-1", version, b"one"), two.swap_state("client-a", "pair-1", version, b"two")]
            )
            self.assertEqual(wins.count(True), 1)
        self.assertEqual((await two.get_pair("client-a", "pair-1")).version, 20)

    async def test_limits_across_instances(self):
        """The per-client bound holds over creations racing through two instances."""
        one, two = await self.connect(max_pairs_per_client=5), await self.connect(max_pairs_per_client=5)
        results = await defer.DeferredList(
            [r.create_pair(pair(pair_id=f"p{i}-{n}")) for i in range(10) for n, r in enumerate((one, two))],
            consumeErrors=True,
        )
        self.assertEqual(sum(ok for ok, _ in results), 5)
        self.assertEqual((await one.get_client("client-a")).pair_count, 5)


class RedisPairCopyTests(RedisTestMixin, TestCase):
    """An MKE pair's record answered from this process's short-lived copy: what it spares, and what it never hides."""

    async def test_mke_record_answered_from_copy(self):
        """
        Within pair_cache_seconds an MKE record is answered without Redis (a change made through another instance
        is not seen); after forget, or once the copy is older than that, the stored record is read again.
        """
        one, two = await self.connect(pair_cache_seconds=60), await self.connect()
        await one.create_pair(pair())
        await one.get_pair("client-a", "pair-1")
        self.assertTrue(await two.swap_state("client-a", "pair-1", 0, b"epoch-2"))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).state, STATE)
        self.assertTrue(one.forget("client-a", "pair-1"))
        self.assertFalse(one.forget("client-a", "pair-1"))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).state, b"epoch-2")

        brief = await self.connect(pair_cache_seconds=0.2)
        await brief.get_pair("client-a", "pair-1")
        self.assertTrue(await two.swap_state("client-a", "pair-1", 1, b"epoch-3"))
        await task.deferLater(reactor, 0.3)
        self.assertEqual((await brief.get_pair("client-a", "pair-1")).state, b"epoch-3")

    async def test_mte_records_never_copied(self):
        """An MTE record (a new state every message) is always read from Redis."""
        one, two = await self.connect(pair_cache_seconds=60), await self.connect()
        await one.create_pair(pair(encode_type="MTE"))
        await one.get_pair("client-a", "pair-1")
        self.assertTrue(await two.swap_state("client-a", "pair-1", 0, b"step-1"))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).state, b"step-1")
        self.assertFalse(one.forget("client-a", "pair-1"))

    async def test_own_changes_drop_the_copy(self):
        """This instance's own swap, re-creation or deletion of a pair is seen by its next read."""
        r = await self.connect(pair_cache_seconds=60)
        await r.create_pair(pair())
        await r.get_pair("client-a", "pair-1")
        self.assertTrue(await r.swap_state("client-a", "pair-1", 0, b"epoch-2"))
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"epoch-2")
        await r.create_pair(pair(state=b"again", now=5.0))
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"again")
        await r.delete_pair("client-a", "pair-1")
        with self.assertRaises(UnknownPair):
            await r.get_pair("client-a", "pair-1")

    async def test_read_under_way_keeps_no_copy_older_than_own_change(self):
        """
        A read that was under way when this instance swapped, created again or deleted the pair keeps no copy of what
        it fetched: the next read sees the change.
        """
        r = await self.connect(pair_cache_seconds=60, poolsize=1)  # one connection: the read reaches Redis first
        changes = {
            "pair-1": lambda: r.swap_state("client-a", "pair-1", 0, b"changed"),
            "pair-2": lambda: r.create_pair(pair(pair_id="pair-2", state=b"changed", now=5.0)),
            "pair-3": lambda: r.delete_pair("client-a", "pair-3"),
        }
        for pair_id, change in changes.items():
            await r.create_pair(pair(pair_id=pair_id))
            reading = r.get_pair("client-a", pair_id)
            await change()
            self.assertEqual((await reading).state, STATE)
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"changed")
        self.assertEqual((await r.get_pair("client-a", "pair-2")).state, b"changed")
        with self.assertRaises(UnknownPair):
            await r.get_pair("client-a", "pair-3")
        self.assertEqual(r._reading, {}, "reads that ended are no longer tracked")

    async def test_read_overtaking_own_change_keeps_no_copy(self):
        """
        A read sent while this instance's swap is under way, on another connection, may reach Redis before the swap:
        once the swap has answered, no copy from before it is kept. (Redis is paused so that the read's connection,
        already waiting with an earlier command, runs before the swap's.)
        """
        r = await self.connect(pair_cache_seconds=60)
        await r.create_pair(pair())
        await self.until(lambda: len(r._factory.pool) == 2)
        first, second = r._factory.pool
        connections = iter([first, second, first])
        steering = self.patch(r._factory.connectionQueue, "peek", lambda: defer.succeed(next(connections)))
        self.server.command("CLIENT", "PAUSE", 1000, "ALL")
        earlier = r.get_client("client-a")  # on the first connection, which the pause holds back first
        await task.deferLater(reactor, 0.2)
        swapping = r.swap_state("client-a", "pair-1", 0, b"changed")  # on the second, held back next
        await task.deferLater(reactor, 0.2)
        reading = r.get_pair("client-a", "pair-1")  # on the first again: it runs before the swap
        self.assertEqual((await reading).state, STATE)
        self.assertTrue(await swapping)
        await earlier
        steering.restore()
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"changed")

    async def test_replaced_pair_found_out(self):
        """A copy of a pair another instance deleted and created again fails the mark (560) and is dropped."""
        one, two = await self.connect(pair_cache_seconds=60), await self.connect()
        await one.create_pair(pair(now=1.0))
        copy = await one.get_pair("client-a", "pair-1")
        await two.delete_pair("client-a", "pair-1")
        await two.create_pair(pair(now=2.0))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).created, copy.created)
        with self.assertRaises(UnknownPair):
            await one.mark_seen("client-a", "pair-1", 1, 64, created=copy.created)
        self.assertFalse(one.forget("client-a", "pair-1"))
        self.assertEqual((await one.get_pair("client-a", "pair-1")).created, 2.0)

    async def test_copies_expire_unread(self):
        """A copy is dropped pair_cache_seconds after it was fetched even if nothing reads the pair again."""
        clock = task.Clock()
        r = await self.connect(clock=clock, pair_cache_seconds=0.5)
        for n in (1, 2):
            await r.create_pair(pair(pair_id=f"pair-{n}"))
            await r.get_pair("client-a", f"pair-{n}")
        clock.advance(0.3)
        self.assertTrue(r.forget("client-a", "pair-1"))
        clock.advance(0.3)
        self.assertFalse(r.forget("client-a", "pair-2"))

    async def test_copy_of_deleted_pair_dropped(self):
        """When the mark finds the pair gone (deleted through another instance), the copy goes with it."""
        one, two = await self.connect(pair_cache_seconds=60), await self.connect()
        await one.create_pair(pair())
        await one.get_pair("client-a", "pair-1")
        await two.delete_pair("client-a", "pair-1")
        with self.assertRaises(UnknownPair):
            await one.mark_seen("client-a", "pair-1", 1, 64, created=0.0)
        self.assertFalse(one.forget("client-a", "pair-1"))

    async def test_no_copies(self):
        """With pair_cache_size 0 nothing is kept and every read goes to Redis."""
        r = await self.connect(pair_cache_size=0)
        await r.create_pair(pair())
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, STATE)
        self.assertFalse(r.forget("client-a", "pair-1"))

    async def test_copies_bounded(self):
        """No more than pair_cache_size copies are kept; the oldest goes first."""
        r = await self.connect(pair_cache_seconds=60, pair_cache_size=2)
        for n in range(3):
            await r.create_pair(pair(pair_id=f"pair-{n}"))
            await r.get_pair("client-a", f"pair-{n}")
        self.assertEqual([r.forget("client-a", f"pair-{n}") for n in range(3)], [False, True, True])


class RedisFailureTests(RedisTestMixin, TestCase):
    """Redis going away and coming back."""

    redis_options = {"persistent": True}

    async def test_restart(self):
        """While redis-server is down operations fail fast with 503; after restart they recover with state intact."""
        registry = await self.connect(timeout=1.0, reconnect_delay=0.1, max_reconnect_delay=0.5)
        await registry.create_pair(pair(encode_type="MTE"))
        await registry.reserve_counters("client-a", "pair-1", 10)
        self.assertTrue(await registry.swap_state("client-a", "pair-1", 0, b"v1"))
        self.assertTrue(await registry.mark_seen("client-a", "pair-1", 3, 64))

        self.server.stop()
        for _ in range(3):
            started = reactor.seconds()
            with self.assertRaises(RegistryUnavailable) as caught:
                await registry.get_pair("client-a", "pair-1")
            self.assertEqual(caught.exception.code, 503)
            self.assertLess(reactor.seconds() - started, registry.timeout + 0.5)
            await task.deferLater(reactor, 0.1)

        self.server.restart()
        record = await self.eventually(lambda: registry.get_pair("client-a", "pair-1"))
        self.assertEqual((record.state, record.version), (b"v1", 1))
        self.assertEqual(await registry.reserve_counters("client-a", "pair-1"), 10)
        self.assertFalse(await registry.mark_seen("client-a", "pair-1", 3, 64))
        self.assertFalse(await registry.swap_state("client-a", "pair-1", 0, b"stale"))

    async def test_unreachable_times_out(self):
        """A registry pointed at a port where nothing listens answers 503 within its timeout."""
        self.server.stop()
        registry = self.start(timeout=0.3)
        for d in [registry.whenConnected(), registry.get_pair("client-a", "pair-1")]:
            with self.assertRaises(RegistryUnavailable):
                await d

    async def test_timeout_logged_readably(self):
        """An operation Redis did not answer in time is logged as a readable warning, the timeout as its own field."""
        self.server.stop()
        events = self.logged()
        registry = self.start(timeout=0.3)
        with self.assertRaises(RegistryUnavailable):
            await registry.get_pair("client-a", "pair-1")
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            formatEvent(warning), "Redis did not answer within 0.3 s (0 more failures since the last warning)"
        )
        self.assertEqual(warning["timeout"], 0.3)

    async def test_evicting_redis_warned_about(self):
        """A Redis that may evict keys (a maxmemory-policy other than noeviction) is warned about once connected,
        since it could drop a pair's replay marks; the default noeviction is not."""
        events = self.logged()
        await self.connect()
        await self.until(lambda: any("maxmemory-policy" in formatEvent(e) for e in events))
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])
        self.server.command("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
        await self.connect()
        await self.until(lambda: [e for e in events if e["log_level"] == LogLevel.warn])
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("maxmemory-policy is volatile-lru, not noeviction", formatEvent(warning))

    async def test_waiting_operations_bounded(self):
        """With Redis unreachable from the start, operations beyond MAX_PENDING answer 503 at once, queueing nothing."""
        self.server.stop()
        self.patch(redis_registry, "MAX_PENDING", 50)
        registry = self.start(timeout=0.3)
        waiting = [registry.get_pair("client-a", "pair-1") for _ in range(50)]
        with self.assertRaises(RegistryUnavailable) as caught:
            await registry.get_pair("client-a", "pair-1")
        self.assertEqual(caught.exception.detail, "Redis is not connected yet")
        for d in waiting:
            with self.assertRaises(RegistryUnavailable):
                await d

    async def test_wrong_password(self):
        """A server refusing the password makes every operation answer 503, without a hang."""
        self.server.stop()
        self.server = self.start_redis(password="right")
        registry = self.start(self.server.url.replace("right", "wrong"), timeout=0.5)
        with self.assertRaises(RegistryUnavailable):
            await registry.get_pair("client-a", "pair-1")

    async def test_refused_login_on_reconnect_is_retried(self):
        """A reconnection whose AUTH fails once (a password being rotated) is retried: the registry comes back."""
        self.server.stop()
        self.server = self.start_redis(password="right")
        registry = await self.connect(timeout=1.0, reconnect_delay=0.1, max_reconnect_delay=0.3)
        await registry.create_pair(pair())
        self.server.command("CONFIG", "SET", "requirepass", "other")
        self.server.password = "other"
        self.server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await task.deferLater(reactor, 1.0)  # reconnections refused meanwhile
        self.server.command("CONFIG", "SET", "requirepass", "right")
        self.server.password = "right"
        record = await self.eventually(lambda: registry.get_pair("client-a", "pair-1"), seconds=5)
        self.assertEqual(record.pair_id, "pair-1")

    async def test_refused_first_login_then_connected(self):
        """
        When Redis refuses the first login (a password being rotated) and accepts a later one, the registry knows it
        is connected: whenConnected fires, and once that connection is lost operations answer 503 at once instead of
        waiting for the timeout.
        """
        self.server.stop()
        self.server = self.start_redis(password="right")
        url = self.server.url
        self.server.command("CONFIG", "SET", "requirepass", "other")
        self.server.password = "other"
        events = self.logged()
        registry = self.start(url, timeout=2.0, reconnect_delay=0.1, max_reconnect_delay=0.3)
        await self.until(lambda: any(e["log_level"] == LogLevel.error for e in events))
        self.server.command("CONFIG", "SET", "requirepass", "right")
        self.server.password = "right"
        await registry.whenConnected()
        await registry.create_pair(pair())
        self.server.stop()
        await self.until(lambda: not registry._factory.size)
        started = reactor.seconds()
        with self.assertRaises(RegistryUnavailable) as caught:
            await registry.get_pair("client-a", "pair-1")
        self.assertEqual(caught.exception.detail, "Redis connection lost; reconnecting")
        self.assertLess(reactor.seconds() - started, registry.timeout / 2)

    async def test_outage_and_recovery_logged(self):
        """Losing Redis is logged as a warning (at most once a second, with the failures counted), and so is the
        first answer once it is back: an operator reading the log sees when the 503s began and ended."""
        registry = await self.connect(timeout=2.0, reconnect_delay=0.1, max_reconnect_delay=0.3)
        await registry.create_pair(pair())
        events = self.logged()
        self.server.stop()
        await self.until(lambda: not registry._factory.size)
        for _ in range(3):
            with self.assertRaises(RegistryUnavailable):
                await registry.get_pair("client-a", "pair-1")
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warnings, ["Redis unavailable: connection lost, reconnecting (0 more failures since the last"
                                    " warning)"])
        self.server.restart()
        await self.eventually(lambda: registry.create_pair(pair()), seconds=5)
        recovered = [formatEvent(e) for e in events if "answers again" in formatEvent(e)]
        self.assertEqual(len(recovered), 1)
        self.assertRegex(recovered[0], r"Redis answers again \([1-9]\d* more failures since the last warning\)")

    async def test_demoted_primary_left(self):
        """A server demoted to a replica (READONLY) is left: its connections close and reconnect (finding the new
        primary)."""
        registry = await self.connect(timeout=1.0, reconnect_delay=0.1, max_reconnect_delay=0.3)
        await registry.create_pair(pair())
        before = list(registry._factory.pool)
        other = self.start_redis()
        self.server.command("REPLICAOF", "127.0.0.1", str(other.port))
        with self.assertRaises(RegistryUnavailable):
            await registry.reserve_counters("client-a", "pair-1")
        self.server.command("REPLICAOF", "NO", "ONE")
        await self.eventually(lambda: registry.create_pair(pair(pair_id="pair-2")), seconds=5)
        self.assertEqual([connection for connection in before if connection.connected], [])

    def logged(self):
        """The registries' log events from now on: a list that grows."""
        events = []

        def keep(event):
            if event.get("log_namespace") == RedisRegistry.log.namespace:
                events.append(event)

        globalLogPublisher.addObserver(keep)
        self.addCleanup(globalLogPublisher.removeObserver, keep)
        return events

    async def eventually(self, operation, seconds=10):
        """The first result of ``operation`` that is not a RegistryUnavailable, trying every 0.1 s."""
        deadline = reactor.seconds() + seconds
        while True:
            try:
                return await operation()
            except RegistryUnavailable:
                if reactor.seconds() > deadline:
                    raise
                await task.deferLater(reactor, 0.1)


class RedisAddressTests(RedisTestMixin, TestCase):
    """The REDIS_URL forms, parsed and actually connected to."""

    redis_options = {"password": "s3cret", "unix_socket": True}

    async def test_password_and_db_over_tcp(self):
        """redis:// with a password and a db number stores the pairs in that db."""
        registry = await self.connect(self.server.url.replace("/0", "/3"))
        await registry.create_pair(pair())
        self.assertEqual(self.server.command("SELECT", 3), b"OK")
        self.assertEqual(await registry.reserve_counters("client-a", "pair-1"), 0)
        info = self.server.info("keyspace")
        self.assertIn("db3", info)
        self.assertNotIn("db0", info)

    async def test_unix_socket(self):
        """unix:// and redis+unix:// reach the server over its socket, sharing its pairs."""
        one = await self.connect(self.server.unix_url)
        two = await self.connect(self.server.unix_url.replace("unix://", "redis+unix://"))
        await one.create_pair(pair())
        self.assertEqual((await two.get_pair("client-a", "pair-1")).state, pair().state)


class RedisTLSTests(RedisTestMixin, TestCase):
    """rediss:// against a TLS-only server with a self-signed certificate."""

    redis_options = {"tls": True}

    def trusting(self, certificate_path):
        with open(certificate_path, "rb") as f:
            return optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(f.read()))

    async def test_tls_with_trusted_certificate(self):
        """Trusting the server's certificate, the registry works over TLS."""
        registry = await self.connect(tls_options=self.trusting(self.server.certificate_path))
        await registry.create_pair(pair())
        self.assertEqual((await registry.get_pair("client-a", "pair-1")).state, pair().state)

    async def test_tls_refuses_unknown_certificate(self):
        """A server whose certificate the registry does not trust is unavailable (503), never used."""
        registry = self.start(timeout=1.0)
        with self.assertRaises(RegistryUnavailable):
            await registry.get_pair("client-a", "pair-1")


class RedisUrlParsingTests(SynchronousTestCase):
    """REDIS_URL parsing, without a server."""

    def test_forms(self):
        """Every supported scheme yields its host or path, TLS flag, db and credentials."""
        self.assertEqual(
            RedisAddress.from_url("rediss://user:p%40ss@cache.example:6380/2"),
            RedisAddress(host="cache.example", port=6380, db=2, tls=True, username="user", password="p@ss"),
        )
        self.assertEqual(RedisAddress.from_url("redis://10.0.1.230"), RedisAddress(host="10.0.1.230"))
        self.assertEqual(
            RedisAddress.from_url("unix:///run/redis.sock?db=4&password=x"),
            RedisAddress(path="/run/redis.sock", db=4, password="x"),
        )
        self.assertEqual(RedisAddress.from_url("redis+unix:///run/redis.sock").path, "/run/redis.sock")

    def test_refused_forms(self):
        """Unknown schemes, missing hosts or paths and non-numeric db numbers are configuration errors."""
        for url in ["http://x", "redis://", "unix://", "redis://h/x", "redis://h:port"]:
            self.assertRaises(ValueError, RedisAddress.from_url, url)

    def test_refused_rather_than_ignored(self):
        """What the registry would ignore or replace is refused: port 0 (it became 6379), a port beyond 65535, a
        negative or odd db number (SELECT would fail at run time), a user without a password (AUTH would be skipped)
        and query parameters other than db and password (?sslcert= would be read as nothing)."""
        for url, reason in (
            ("redis://h:0", "the port must be a number from 1 to 65535"),
            ("redis://h:65536", "the port must be a number from 1 to 65535"),
            ("redis://h/-1", "the db number must be a non-negative integer"),
            ("redis://h/1_0", "the db number must be a non-negative integer"),
            ("unix:///run/redis.sock?db=-1", "the db number must be a non-negative integer"),
            ("redis://alice@h", "a user needs a password (user:password@)"),
            ("unix://alice:@/run/redis.sock", "a user needs a password (user:password@)"),
            ("rediss://:p@h?sslcert=/etc/redis.pem", "db and password are the only query parameters read"),
            ("redis://h?timeout", "db and password are the only query parameters read"),
        ):
            self.assertEqual(str(self.assertRaises(ValueError, RedisAddress.from_url, url)), f"REDIS_URL: {reason}")
        self.assertEqual(
            RedisAddress.from_url("redis://alice@h:65535/15?password=p"),
            RedisAddress(host="h", port=65535, db=15, username="alice", password="p"),
        )

    def test_repr_hides_password(self):
        """The parsed address never shows its password."""
        self.assertNotIn("s3cret", repr(RedisAddress.from_url("redis://:s3cret@h")))
