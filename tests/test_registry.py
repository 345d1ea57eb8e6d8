"""
The registry contract, run against the memory registry here and against Redis in ``tests.test_registry_redis``.
"""

import heapq

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mterelay import registry
from mterelay.errors import RelayError
from mterelay.registry import (
    IRegistry,
    MemoryRegistry,
    PairLimitExceeded,
    PairRecord,
    UnknownPair,
    mark_window,
)

#: A state that is neither UTF-8 nor safe from a client that turns digits into numbers.
STATE = b"\x00\xff\x80secret\r\n"


def pair(client_id="client-a", pair_id="pair-1", state=STATE, encode_type="MKE", now=0.0):
    return PairRecord(
        client_id=client_id, pair_id=pair_id, encode_type=encode_type, state=state, created=now, last_used=now
    )


class RegistryContractMixin:
    """
    The behaviour every ``IRegistry`` shows. A test case mixing it in provides:

    - ``async make_registry(**kwargs)``: a fresh, empty registry built with these constructor options;
    - ``async advance(seconds)``: let that much time pass for the registry;
    - ``short_ttl``: a pair TTL (seconds) for the expiry tests, long enough to act within it.
    """

    async def failure(self, d, kind):
        """The error ``d`` fails with, checked to be a ``kind``."""
        try:
            result = await d
        except kind as e:
            return e
        self.fail(f"expected {kind.__name__}, got {result!r}")

    async def marks(self, r, counters, window):
        """``mark_seen`` of each counter in turn on client-a's pair-1: the list of answers."""
        return [await r.mark_seen("client-a", "pair-1", c, window) for c in counters]

    async def test_provides_interface(self):
        """The registry provides every method and attribute of IRegistry."""
        self.assertTrue(verifyObject(IRegistry, await self.make_registry()))

    async def test_create_then_get(self):
        """A stored pair comes back with its opaque state byte for byte, at version 0."""
        r = await self.make_registry()
        await r.create_pair(pair())
        got = await r.get_pair("client-a", "pair-1")
        self.assertEqual(
            (got.client_id, got.pair_id, got.encode_type, got.state, got.version), ("client-a", "pair-1", "MKE", STATE, 0)
        )

    async def test_numeric_looking_state_stays_bytes(self):
        """A state made of digits is returned as the same bytes, never as a number."""
        r = await self.make_registry()
        await r.create_pair(pair(state=b"12345"))
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"12345")

    async def test_get_refreshes_last_used(self):
        """Reading a pair moves its last_used forward to the registry's now."""
        r = await self.make_registry()
        await r.create_pair(pair())
        first = await r.get_pair("client-a", "pair-1")
        await self.advance(self.short_ttl / 4)
        second = await r.get_pair("client-a", "pair-1")
        self.assertGreater(second.last_used, first.last_used)

    async def test_unknown_pair(self):
        """Every per-pair operation on an absent pair fails with UnknownPair (560)."""
        r = await self.make_registry()
        await r.create_pair(pair())
        for d in [
            r.get_pair("client-a", "nope"),
            r.get_pair("client-b", "pair-1"),
            r.reserve_counters("client-a", "nope"),
            r.mark_seen("client-a", "nope", 0, 64),
            r.mark_seen("client-a", "nope", 0, 64),
            r.swap_state("client-a", "nope", 0, b"x"),
        ]:
            self.assertEqual((await self.failure(d, UnknownPair)).code, 560)

    async def test_ids_do_not_collide(self):
        """Ids containing separators and braces address distinct pairs."""
        r = await self.make_registry()
        await r.create_pair(pair("a:b", "c", state=b"one"))
        await r.create_pair(pair("a", "b:c", state=b"two"))
        await r.create_pair(pair("{a}", "}c{", state=b"three"))
        self.assertEqual((await r.get_pair("a:b", "c")).state, b"one")
        self.assertEqual((await r.get_pair("a", "b:c")).state, b"two")
        self.assertEqual((await r.get_pair("{a}", "}c{")).state, b"three")

    async def test_reserve_counters_consecutive(self):
        """Reservations hand out consecutive ranges starting at 0."""
        r = await self.make_registry()
        await r.create_pair(pair())
        self.assertEqual(await r.reserve_counters("client-a", "pair-1"), 0)
        self.assertEqual(await r.reserve_counters("client-a", "pair-1", 5), 1)
        self.assertEqual(await r.reserve_counters("client-a", "pair-1"), 6)

    async def test_concurrent_reservations_distinct(self):
        """Reservations issued together never overlap."""
        r = await self.make_registry()
        await r.create_pair(pair())
        firsts = await defer.gatherResults([r.reserve_counters("client-a", "pair-1", 3) for _ in range(100)])
        counters = {first + i for first in firsts for i in range(3)}
        self.assertEqual(counters, set(range(300)))

    async def test_mark_seen_once(self):
        """A counter is accepted once; its repeat is refused."""
        r = await self.make_registry()
        await r.create_pair(pair())
        self.assertTrue(await r.mark_seen("client-a", "pair-1", 7, 64))
        self.assertFalse(await r.mark_seen("client-a", "pair-1", 7, 64))

    async def test_mark_seen_window(self):
        """Late counters inside the window are accepted once; counters a window below the highest are refused."""
        r = await self.make_registry()
        await r.create_pair(pair())
        seen = await self.marks(r, [10, 4, 3, 2, 9, 9, 12, 4, 5], 8)
        self.assertEqual(seen, [True, True, True, False, True, False, True, False, True])

    async def test_mark_seen_long_jump(self):
        """A counter far ahead forgets the old marks without refusing anything new inside the window."""
        r = await self.make_registry()
        await r.create_pair(pair())
        self.assertEqual(await self.marks(r, [*range(8), 1000], 8), [True] * 9)
        self.assertEqual(await self.marks(r, [993, 992, 1000, 7], 8), [True, False, False, False])

    async def test_mark_seen_gap_inside_window(self):
        """
        Counters skipped by a jump shorter than the window are fresh again (their bits held marks from a window ago,
        wrapping around the bitmap and starting mid-byte), while marks still inside the window stay.
        """
        r = await self.make_registry()
        await r.create_pair(pair())
        self.assertEqual(await self.marks(r, [*range(64), 100], 64), [True] * 65)
        seen = await self.marks(r, [99, 64, 80, 50, 63, 37, 36], 64)
        self.assertEqual(seen, [True, True, True, False, False, False, False])
        # 128's bit is the one 64 set; 101 and 102 sit mid-byte.
        seen = await self.marks(r, [130, 128, 129, 101, 102, 99, 80, 67, 66], 64)
        self.assertEqual(seen, [True, True, True, True, True, False, False, True, False])

    async def test_mark_seen_gap_odd_window(self):
        """With a window no multiple of 8, a gap clears exactly the skipped counters' bits, the last byte too."""
        r = await self.make_registry()
        await r.create_pair(pair())
        # 24 skips 13..23: bits 0..10 (a whole first byte and three bits of the second). Bit 12 keeps 12's mark; 11
        # is now below the window (its bit is 24's).
        self.assertEqual(await self.marks(r, [*range(13), 24], 13), [True] * 14)
        self.assertEqual(await self.marks(r, [23, 13, 20, 12, 11, 24], 13), [True, True, True, False, False, False])

    async def test_mark_seen_refuses_replaced_pair(self):
        """
        A mark for the pair as it was created before (its creation time) fails with UnknownPair once the pair was
        created again with the same ids, and marks nothing: the new pair still takes that counter.
        """
        r = await self.make_registry()
        await r.create_pair(pair(now=1.0))
        old = await r.get_pair("client-a", "pair-1")
        self.assertTrue(await r.mark_seen("client-a", "pair-1", 3, 64, created=old.created))
        await r.create_pair(pair(now=2.0))
        await self.failure(r.mark_seen("client-a", "pair-1", 4, 64, created=old.created), UnknownPair)
        self.assertTrue(await r.mark_seen("client-a", "pair-1", 4, 64, created=2.0))
        self.assertTrue(await r.mark_seen("client-a", "pair-1", 3, 64))

    async def test_swap_refuses_replaced_pair(self):
        """A swap for the pair as it was created before fails with UnknownPair and leaves the new pair's state."""
        r = await self.make_registry()
        await r.create_pair(pair(now=1.0))
        await r.create_pair(pair(state=b"new", now=2.0))
        await self.failure(r.swap_state("client-a", "pair-1", 0, b"old keys", created=1.0), UnknownPair)
        got = await r.get_pair("client-a", "pair-1")
        self.assertEqual((got.state, got.version), (b"new", 0))
        self.assertTrue(await r.swap_state("client-a", "pair-1", 0, b"next", created=2.0))

    async def test_forget_without_copy(self):
        """Forgetting a pair the process keeps no copy of says so, and the pair itself stays."""
        r = await self.make_registry()
        await r.create_pair(pair(encode_type="MTE"))
        self.assertFalse(r.forget("client-a", "pair-1"))
        self.assertFalse(r.forget("client-a", "pair-2"))
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, STATE)

    async def test_bad_counter_arguments(self):
        """Negative counters, empty or huge windows and empty reservations are refused with 400."""
        r = await self.make_registry()
        await r.create_pair(pair())
        for d in [
            r.mark_seen("client-a", "pair-1", -1, 64),
            r.mark_seen("client-a", "pair-1", 0, 0),
            r.mark_seen("client-a", "pair-1", 0, 10**9),
            r.reserve_counters("client-a", "pair-1", 0),
        ]:
            self.assertEqual((await self.failure(d, RelayError)).code, 400)

    async def test_swap_state(self):
        """A swap at the current version wins and bumps it; a swap at a stale version changes nothing."""
        r = await self.make_registry()
        await r.create_pair(pair(encode_type="MTE"))
        self.assertTrue(await r.swap_state("client-a", "pair-1", 0, b"next"))
        self.assertFalse(await r.swap_state("client-a", "pair-1", 0, b"lost"))
        got = await r.get_pair("client-a", "pair-1")
        self.assertEqual((got.state, got.version), (b"next", 1))

    async def test_concurrent_swaps_one_winner(self):
        """Of many swaps issued together on one version, exactly one wins."""
        r = await self.make_registry()
        await r.create_pair(pair(encode_type="MTE"))
        wins = await defer.gatherResults([r.swap_state("client-a", "pair-1", 0, b"s%d" % i) for i in range(20)])
        self.assertEqual(wins.count(True), 1)
        self.assertEqual((await r.get_pair("client-a", "pair-1")).state, b"s%d" % wins.index(True))

    async def test_create_replaces(self):
        """Pairing again under the same ids replaces the state and starts counters and marks over."""
        r = await self.make_registry()
        await r.create_pair(pair())
        await r.reserve_counters("client-a", "pair-1", 10)
        await r.mark_seen("client-a", "pair-1", 3, 64)
        await r.swap_state("client-a", "pair-1", 0, b"old")
        await r.create_pair(pair(state=b"new"))
        got = await r.get_pair("client-a", "pair-1")
        self.assertEqual((got.state, got.version), (b"new", 0))
        self.assertEqual(await r.reserve_counters("client-a", "pair-1"), 0)
        self.assertTrue(await r.mark_seen("client-a", "pair-1", 3, 64))
        self.assertEqual((await r.get_client("client-a")).pair_count, 1)

    async def test_delete_pair(self):
        """A deleted pair is unknown and no longer counted; deleting it again is harmless."""
        r = await self.make_registry()
        await r.create_pair(pair())
        await r.create_pair(pair(pair_id="pair-2"))
        await r.delete_pair("client-a", "pair-1")
        await r.delete_pair("client-a", "pair-1")
        await self.failure(r.get_pair("client-a", "pair-1"), UnknownPair)
        self.assertEqual((await r.get_client("client-a")).pair_count, 1)
        self.assertEqual((await r.get_client("nobody")).pair_count, 0)

    async def test_per_client_limit(self):
        """A client cannot hold more than max_pairs_per_client pairs; others and re-pairing are unaffected."""
        r = await self.make_registry(max_pairs_per_client=2)
        await r.create_pair(pair(pair_id="p1"))
        await r.create_pair(pair(pair_id="p2"))
        e = await self.failure(r.create_pair(pair(pair_id="p3")), PairLimitExceeded)
        self.assertEqual(e.code, 567)
        await r.create_pair(pair(pair_id="p2", state=b"again"))
        await r.create_pair(pair(client_id="client-b", pair_id="p3"))
        await r.delete_pair("client-a", "p1")
        await r.create_pair(pair(pair_id="p3"))
        self.assertEqual((await r.get_client("client-a")).pair_count, 2)

    async def test_total_limit(self):
        """The relay holds at most max_pairs_total pairs over all clients."""
        r = await self.make_registry(max_pairs_total=3)
        for client in "abc":
            await r.create_pair(pair(client_id=client))
        await self.failure(r.create_pair(pair(client_id="d")), PairLimitExceeded)

    async def test_idle_pair_expires(self):
        """A pair left unused for pair_ttl is gone and stops counting against the limits."""
        r = await self.make_registry(pair_ttl=self.short_ttl, max_pairs_per_client=1)
        await r.create_pair(pair())
        await self.advance(self.short_ttl * 1.5)
        await self.failure(r.get_pair("client-a", "pair-1"), UnknownPair)
        await r.create_pair(pair(pair_id="pair-2"))

    async def test_expired_pair_never_counts_against_total_limit(self):
        """
        At the relay-wide limit a pair that expired no longer counts: a creation refused while it lived succeeds as
        soon as it expired, however soon after the refusal.
        """
        gap = 0.3
        r = await self.make_registry(pair_ttl=self.short_ttl, max_pairs_total=2)
        await r.create_pair(pair(client_id="a"))
        await self.advance(self.short_ttl / 2)
        await r.create_pair(pair(client_id="b"))
        await self.advance(self.short_ttl / 2 - gap)
        await self.failure(r.create_pair(pair(client_id="c")), PairLimitExceeded)
        await self.advance(2 * gap)  # a expired, b lives on
        await r.create_pair(pair(client_id="c"))

    async def test_use_refreshes_ttl(self):
        """Every use restarts the idle lifetime, for the replay marks too."""
        r = await self.make_registry(pair_ttl=self.short_ttl)
        await r.create_pair(pair())
        await r.mark_seen("client-a", "pair-1", 5, 64)
        # 1.2 TTLs in all, each use well inside the TTL of the one before (a slow, shared machine keeps its margin).
        for _ in range(3):
            await self.advance(self.short_ttl * 0.4)
            await r.reserve_counters("client-a", "pair-1")
        self.assertFalse(await r.mark_seen("client-a", "pair-1", 5, 64))


class MemoryRegistryContractTests(RegistryContractMixin, TestCase):
    """The contract against the memory registry, on a fake clock."""

    short_ttl = 60

    async def make_registry(self, **kwargs):
        self.clock = Clock()
        self.clock.advance(1000)
        return MemoryRegistry(self.clock, **kwargs)

    async def advance(self, seconds):
        self.clock.advance(seconds)


class MemoryRegistryTests(SynchronousTestCase):
    """What only the memory registry does: its sweep."""

    def test_sweep_runs_while_started(self):
        """The service sweeps expired pairs on its clock while running, and stops sweeping when stopped."""
        clock = Clock()
        r = MemoryRegistry(clock, pair_ttl=10, sweep_interval=5)
        r.startService()
        self.successResultOf(r.create_pair(pair()))
        clock.advance(15)
        self.assertEqual(r.sweep(), 0, "the timer already swept the expired pair")
        self.successResultOf(r.create_pair(pair()))
        r.stopService()
        clock.advance(30)
        self.assertEqual(r.sweep(), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refused_creates_scan_little(self):
        """
        A client at its limit gets its own expired pairs dropped, not a scan of every pair per try; at the relay-wide
        limit a try looks only at the pairs whose expiry hint has passed (none while every pair lives), and expired
        pairs make room at once.
        """
        clock = Clock()
        r = MemoryRegistry(clock, pair_ttl=10, max_pairs_per_client=1, max_pairs_total=3)
        looked_at = []
        self.patch(registry, "heappop", lambda heap: looked_at.append(heap[0][2]) or heapq.heappop(heap))
        self.successResultOf(r.create_pair(pair()))
        for i in range(5):
            self.failureResultOf(r.create_pair(pair(pair_id=f"pair-x{i}")), PairLimitExceeded)
        for client in "bc":
            clock.advance(1)
            self.successResultOf(r.create_pair(pair(client_id=client)))
        for _ in range(5):
            self.failureResultOf(r.create_pair(pair(client_id="d")), PairLimitExceeded)
        self.assertEqual(looked_at, [])
        clock.advance(8)  # client-a's pair expires now; b's and c's hints are 11 and 12
        self.successResultOf(r.get_pair("b", "pair-1"))  # b now expires at 20
        clock.advance(1.5)
        self.successResultOf(r.create_pair(pair(client_id="d")))
        self.assertEqual(looked_at, [("client-a", "pair-1"), ("b", "pair-1")])
        for _ in range(5):
            self.failureResultOf(r.create_pair(pair(client_id="e")), PairLimitExceeded)
        self.assertEqual(len(looked_at), 2)

    def test_clock_going_back_keeps_expiry_exact(self):
        """After the clock went back, a pair used since expires (and makes room at the relay-wide limit) at its new,
        earlier expiry, not at the later one it had been queued with."""
        clock = Clock()
        clock.advance(100)
        r = MemoryRegistry(clock, pair_ttl=10, max_pairs_total=1)
        self.successResultOf(r.create_pair(pair()))  # queued to expire at 110
        clock.rightNow = 50  # the wall clock was stepped back
        self.successResultOf(r.get_pair("client-a", "pair-1"))  # now expires at 60
        clock.advance(11)
        self.failureResultOf(r.get_pair("client-a", "pair-1"), UnknownPair)
        self.successResultOf(r.create_pair(pair(client_id="b")))

    def test_expiry_heap_bounded(self):
        """Pairs deleted or replaced leave at most as many entries in the expiry heap as there are pairs."""
        r = MemoryRegistry(Clock())
        for i in range(1000):
            self.successResultOf(r.create_pair(pair()))
            self.successResultOf(r.create_pair(pair(pair_id=f"gone-{i}")))
            self.successResultOf(r.delete_pair("client-a", f"gone-{i}"))
        self.assertLessEqual(len(r._expiries), 4)  # twice the two pairs there were after the last creation

    def test_repr_hides_state(self):
        """A record's repr never shows its codec state."""
        self.assertNotIn("secret", repr(pair()))


class MarkWindowTests(SynchronousTestCase):
    """The replay window arithmetic."""

    def test_marks_stay_within_window(self):
        """However far counters jump, the marks never exceed window bits."""
        highest, marks = -1, 0
        for counter in [0, 3, 2**52, 2**52 - 1, 2**52 + 40]:
            fresh, highest, marks = mark_window(highest, marks, counter, 16)
            self.assertTrue(fresh)
            self.assertLess(marks, 1 << 16)
