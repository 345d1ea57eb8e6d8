"""
The session registry: where a relay keeps its clients' pairs.

A pair's codec state is opaque bytes here (the codec serializes it); the registry only offers the atomic operations the
codec needs on top of storing it: counter reservation (MKE sends), replay marks (MKE receives) and a compare-and-swap of
the state (the MTE ratchet). ``MemoryRegistry`` serves one process; ``mterelay.redis_registry.RedisRegistry`` lets
several relay processes share the same pairs.

Replay window: ``mark_seen(..., counter, window)`` accepts each counter once, and refuses any counter at least
``window`` below the highest one seen so far, so a pair needs ``window`` bits of memory. A pair must always be checked
with the same ``window``.
"""

import itertools
from heapq import heapify, heappop, heappush

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mterelay.errors import RelayError

#: Idle lifetime of a pair, in seconds, unless configured (``--pair-ttl``).
DEFAULT_PAIR_TTL = 1800
DEFAULT_MAX_PAIRS_PER_CLIENT = 100
DEFAULT_MAX_PAIRS_TOTAL = 100_000
#: Seconds between two sweeps of expired pairs in the memory registry.
DEFAULT_SWEEP_INTERVAL = 60

ENCODE_TYPES = ("MKE", "MTE")
#: Bounds on what a caller may ask for: a window costs that many bits per pair; counters stay exact in a Lua number.
MAX_WINDOW = 1 << 16
MAX_RESERVATION = 1 << 20


class UnknownPair(RelayError):
    """The registry holds no (live) pair for this client id and pair id."""

    def __init__(self, detail=None):
        super().__init__(560, detail)


class PairLimitExceeded(RelayError):
    """Creating the pair would exceed the per-client or the total pair bound."""

    def __init__(self, detail=None):
        super().__init__(567, detail)


class RegistryUnavailable(RelayError):
    """The registry's store (Redis) is unreachable or did not answer in time."""

    def __init__(self, detail=None):
        super().__init__(503, detail)


@attrs.frozen
class PairRecord:
    """One pair of a client: its codec state (opaque, secret) and its bookkeeping."""

    client_id: str
    pair_id: str
    encode_type: str = attrs.field(validator=attrs.validators.in_(ENCODE_TYPES))
    #: The codec's serialized state: a secret, never shown in a repr or a log.
    state: bytes = attrs.field(repr=False, validator=attrs.validators.instance_of(bytes))
    #: Incremented by every successful ``swap_state``.
    version: int = 0
    #: Epoch seconds, from the registry's clock.
    created: float = 0.0
    last_used: float = 0.0

    def used_at(self, when):
        """This record with ``last_used`` set to ``when`` (built directly: ``attrs.evolve`` costs twice as much)."""
        return PairRecord(
            client_id=self.client_id,
            pair_id=self.pair_id,
            encode_type=self.encode_type,
            state=self.state,
            version=self.version,
            created=self.created,
            last_used=when,
        )


@attrs.frozen
class ClientRecord:
    """What the registry knows of one client: how many live pairs it holds."""

    client_id: str
    pair_count: int


class IRegistry(Interface):
    """
    Stores pairs, keyed by (client id, pair id), for one or many relay processes.

    Every method but ``forget`` returns a Deferred. Failures are ``RelayError`` subclasses: ``UnknownPair`` (560) when
    the pair is absent or expired, ``PairLimitExceeded`` (567), ``RegistryUnavailable`` (503) when the store cannot be
    reached in time. Every operation on a pair in the store refreshes its idle lifetime (``pair_ttl``); a ``get_pair``
    answered from a copy (see there) does not.
    """

    pair_ttl = Attribute("Idle lifetime of a pair, in seconds.")

    def create_pair(record):
        """
        Store ``record`` (a ``PairRecord``) as a fresh pair: counters and replay marks start over.

        An existing pair with the same ids is replaced (a client pairing again). Fires with None, or fails with
        ``PairLimitExceeded`` if the client or the relay already holds its maximum of pairs.
        """

    def get_pair(client_id, pair_id):
        """
        Fire with the ``PairRecord``, its ``last_used`` set to now.

        A shared registry may answer an MKE pair from a copy it fetched shortly before (an MKE state changes once per
        epoch), without refreshing the pair's lifetime: ``mark_seen`` with the record's ``created`` then proves the
        pair still stands (and refreshes it), and ``forget`` drops the copy when it may be out of date.
        """

    def get_client(client_id):
        """Fire with the ``ClientRecord`` (live pair count; 0 for a client without pairs)."""

    def reserve_counters(client_id, pair_id, count=1):
        """
        Fire with the first of ``count`` consecutive counters that no caller, in any process, ever got before.

        The first counter of a fresh pair is 0.
        """

    def mark_seen(client_id, pair_id, counter, window, created=None):
        """
        Fire with True the first time ``counter`` is marked; False for a repeat, or for a counter ``window`` or more
        below the highest counter marked so far.

        With ``created`` (the ``created`` of the record the message was opened with), fail with ``UnknownPair`` and
        mark nothing when the pair now stored was created at another time: the pair was replaced, and the message
        belongs to one that no longer exists.
        """

    def forget(client_id, pair_id):
        """Drop any copy of the pair this process keeps; return True if there was one (not a Deferred)."""

    def swap_state(client_id, pair_id, expected_version, new_state, created=None):
        """
        Replace the state by ``new_state`` if the pair's version is still ``expected_version`` (and, with ``created``,
        if the pair is still the one created then: else ``UnknownPair``, and nothing changes).

        Fire with True (the version is now one more) or False (someone else advanced it first; nothing changed).
        """

    def delete_pair(client_id, pair_id):
        """Forget the pair, if present. Fire with None."""


@attrs.define
class _Slot:
    """
    What the memory registry holds for one pair besides its record. Mutable and private: it is updated in place on
    every message (a new frozen copy per update cost more than the rest of a lookup); callers only ever see records.
    """

    record: PairRecord
    expires: float
    last_used: float
    next_counter: int = 0
    #: Highest counter marked so far (-1: none), and the marks relative to it: bit i is counter ``highest - i``.
    highest: int = -1
    marks: int = 0

    def current_record(self):
        """The record with its last use brought up to date (a new frozen record only when it moved)."""
        if self.record.last_used != self.last_used:
            self.record = self.record.used_at(self.last_used)
        return self.record


def check_mark_args(counter, window):
    """Refuse a counter or window no registry can store (they come from the wire): RelayError 400."""
    if not isinstance(counter, int) or counter < 0 or counter >= 2**53:
        raise RelayError(400, "message counter out of range")
    if not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise RelayError(400, "replay window out of range")


def check_count(count):
    """Refuse a counter reservation that is not a positive, bounded number: RelayError 400."""
    if not isinstance(count, int) or not 1 <= count <= MAX_RESERVATION:
        raise RelayError(400, "counter reservation out of range")


def mark_window(highest, marks, counter, window):
    """
    The replay check shared by every registry: ``(fresh, highest, marks)`` after marking ``counter``.

    ``marks`` has bit i set when counter ``highest - i`` was seen; only ``window`` bits are kept.
    """
    if counter > highest:
        # A jump of a whole window or more forgets every mark (and never builds a huge shifted integer).
        shift = counter - highest
        marks = ((marks << shift) | 1) & ((1 << window) - 1) if shift < window else 1
        return True, counter, marks
    age = highest - counter
    if age >= window or marks >> age & 1:
        return False, highest, marks
    return True, highest, marks | (1 << age)


@implementer(IRegistry)
class MemoryRegistry(Service):
    """
    A registry in this process's memory: the default when no REDIS_URL is set.

    Expired pairs are invisible at once, and dropped by a sweep that runs on ``clock`` while the service runs and
    before a creation is refused at the relay-wide limit. A sweep looks only at the pairs whose expiry hint has passed,
    so a try refused while every pair lives costs no scan.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        pair_ttl=DEFAULT_PAIR_TTL,
        max_pairs_per_client=DEFAULT_MAX_PAIRS_PER_CLIENT,
        max_pairs_total=DEFAULT_MAX_PAIRS_TOTAL,
        sweep_interval=DEFAULT_SWEEP_INTERVAL,
    ):
        self.pair_ttl = pair_ttl
        self._clock = clock
        self._max_per_client = max_pairs_per_client
        self._max_total = max_pairs_total
        self._slots = {}
        self._by_client = {}
        # A heap of (expiry hint, sequence, key, slot), one entry per slot, queued with the slot's expiry: use moves the
        # expiry past the hint (a use after the clock went back queues the slot again), so every expired pair's hint
        # has passed. Deleted, replaced and re-queued slots leave entries behind until they are popped or the heap is
        # rebuilt (when such entries outnumber the slots).
        self._expiries = []
        self._sequence = itertools.count()
        self._sweep = task.LoopingCall(self.sweep)
        self._sweep.clock = clock
        self._sweep_interval = sweep_interval

    def startService(self):
        super().startService()
        self._sweep.start(self._sweep_interval, now=False)

    def stopService(self):
        if self._sweep.running:
            self._sweep.stop()
        return super().stopService()

    def sweep(self):
        """Drop every expired pair; return how many were dropped."""
        now = self._clock.seconds()
        expiries, dropped = self._expiries, 0
        while expiries and expiries[0][0] <= now:
            _, _, key, slot = heappop(expiries)
            if self._slots.get(key) is not slot:
                continue  # deleted or replaced since
            if slot.expires <= now:
                self._drop(key)
                dropped += 1
            else:
                heappush(expiries, self._entry(key, slot))  # used since it was queued
        if dropped:
            self.log.debug("Swept {count} expired pairs", count=dropped)
        return dropped

    def _entry(self, key, slot):
        """The slot's entry in the expiry heap: its expiry now is the hint."""
        return slot.expires, next(self._sequence), key, slot

    def _drop(self, key):
        del self._slots[key]
        client_id, pair_id = key
        pairs = self._by_client[client_id]
        pairs.discard(pair_id)
        if not pairs:
            del self._by_client[client_id]

    def _live(self, client_id, pair_id):
        """The pair's slot, touched (last use and expiry moved to now), or UnknownPair."""
        key = (client_id, pair_id)
        slot = self._slots.get(key)
        now = self._clock.seconds()
        if slot is None or slot.expires <= now:
            raise UnknownPair()
        slot.last_used = now
        went_back = now + self.pair_ttl < slot.expires
        slot.expires = now + self.pair_ttl
        if went_back:
            # The clock went back: the slot's hint in the heap would now come after its expiry.
            self._queue(key, slot)
        return slot

    def create_pair(self, record):
        return defer.maybeDeferred(self._create, record)

    def _create(self, record):
        key = (record.client_id, record.pair_id)
        now = self._clock.seconds()
        if key in self._slots and self._slots[key].expires <= now:
            self._drop(key)
        if key not in self._slots:
            # Expired pairs still in the tables must not count against the bounds: at a limit, the client's own are
            # checked, or the whole table swept (which looks only at the pairs whose expiry hint has passed).
            if len(self._by_client.get(record.client_id, ())) >= self._max_per_client:
                for pair_id in list(self._by_client[record.client_id]):
                    if self._slots[(record.client_id, pair_id)].expires <= now:
                        self._drop((record.client_id, pair_id))
            if len(self._slots) >= self._max_total:
                self.sweep()
            if len(self._by_client.get(record.client_id, ())) >= self._max_per_client:
                raise PairLimitExceeded("too many pairs for this client")
            if len(self._slots) >= self._max_total:
                raise PairLimitExceeded("too many pairs on this relay")
        slot = self._slots[key] = _Slot(record=record, expires=now + self.pair_ttl, last_used=record.last_used)
        self._by_client.setdefault(record.client_id, set()).add(record.pair_id)
        self._queue(key, slot)

    def _queue(self, key, slot):
        """Put the slot's expiry in the heap."""
        heappush(self._expiries, self._entry(key, slot))
        if len(self._expiries) > 2 * len(self._slots):
            # Rebuilt once the entries of deleted, replaced and re-queued slots outnumber the slots: bounded,
            # amortized O(1).
            self._expiries = [self._entry(*item) for item in self._slots.items()]
            heapify(self._expiries)

    def get_pair(self, client_id, pair_id):
        return defer.maybeDeferred(lambda: self._live(client_id, pair_id).current_record())

    def get_client(self, client_id):
        def count():
            now = self._clock.seconds()
            pairs = self._by_client.get(client_id, ())
            return ClientRecord(client_id, sum(1 for p in pairs if self._slots[(client_id, p)].expires > now))

        return defer.maybeDeferred(count)

    def reserve_counters(self, client_id, pair_id, count=1):
        def reserve():
            check_count(count)
            slot = self._live(client_id, pair_id)
            first = slot.next_counter
            slot.next_counter += count
            return first

        return defer.maybeDeferred(reserve)

    def _mark(self, client_id, pair_id, counter, window, created):
        check_mark_args(counter, window)
        slot = self._live(client_id, pair_id)
        if created is not None and slot.record.created != created:
            raise UnknownPair("the pair was replaced")
        fresh, slot.highest, slot.marks = mark_window(slot.highest, slot.marks, counter, window)
        return fresh

    def mark_seen(self, client_id, pair_id, counter, window, created=None):
        return defer.maybeDeferred(self._mark, client_id, pair_id, counter, window, created)

    def forget(self, client_id, pair_id):
        # The slots are the pairs themselves: there is no copy to drop.
        return False

    def swap_state(self, client_id, pair_id, expected_version, new_state, created=None):
        def swap():
            slot = self._live(client_id, pair_id)
            if created is not None and slot.record.created != created:
                raise UnknownPair("the pair was replaced")
            if slot.record.version != expected_version:
                return False
            slot.record = attrs.evolve(slot.record, state=new_state, version=expected_version + 1)
            return True

        return defer.maybeDeferred(swap)

    def delete_pair(self, client_id, pair_id):
        def delete():
            if (client_id, pair_id) in self._slots:
                self._drop((client_id, pair_id))

        return defer.maybeDeferred(delete)
