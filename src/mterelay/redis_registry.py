"""
The Redis registry: pairs shared by every relay process that points at one Redis (txredisapi).

Layout, every key under ``key_prefix`` (default ``mterelay:``), ``{T}`` being the pair's hash tag (client id and pair
id, each percent-encoded, joined by ``:``, so that no two pairs share a tag):

``pair:{T}``
    Hash: ``enc``, ``state``, ``ver``, ``created``, ``used``, ``ctr`` (next counter), ``hi`` (highest marked counter).
``seen:{T}``
    Bitmap of the replay window: counter ``c`` is bit ``c % window``.
``client:{C}`` and ``pairs``
    Sorted sets of the tags of one client's pairs and of all pairs, scored with an expiry hint (epoch ms), to enforce
    the pair limits. A hint may lag behind the key's TTL (use refreshes the TTL, not the hint): pair creation checks
    stale hints against the key and drops the members whose pair has expired. Hints are set and compared on Redis's
    clock (``TIME``; a script may write after it from Redis 5 on), the one every relay shares: a relay whose clock runs
    ahead would otherwise write hints that stay in the future long after the pair expired. ``created`` and ``used``
    are the writing relay's own stamps: nothing compares them with a time (``created`` only with itself, to tell a
    pair from one created again with the same ids).

Every per-request operation is one Lua script over the two keys of one pair (one round trip, atomic, and valid in a
cluster). Only ``create_pair``, ``delete_pair`` and ``get_client`` touch the shared sets: they need a single Redis (or
a cluster where these keys live together), which is what the relay supports.

An MKE pair's record answers ``get_pair`` from the process for ``pair_cache_seconds`` (0.5 s) after it was fetched,
so that a relayed MKE message costs one round trip (its ``mark_seen``) instead of two; a sweep drops expired copies
(none is kept more than twice that).
``mark_seen`` and ``swap_state`` check in the same script that the stored pair is the one the copy came from (its
creation time), and the relay opens a message again with the stored record when a copy could not open it and the pair
was created again since (``forget``): a copy can be out of date, never trusted over Redis.
"""

from collections import OrderedDict
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from mterelay.registry import (
    DEFAULT_MAX_PAIRS_PER_CLIENT,
    DEFAULT_MAX_PAIRS_TOTAL,
    DEFAULT_PAIR_TTL,
    ClientRecord,
    IRegistry,
    PairLimitExceeded,
    PairRecord,
    RegistryUnavailable,
    UnknownPair,
    check_count,
    check_mark_args,
)

DEFAULT_TIMEOUT = 2.0
DEFAULT_PREFIX = "mterelay:"
#: How long an MKE pair's record fetched from Redis answers ``get_pair`` in this process, and how many are kept.
DEFAULT_PAIR_CACHE_SECONDS = 0.5
DEFAULT_PAIR_CACHE_SIZE = 4096
#: Commands one process may have waiting for Redis (queued for a connection or in flight); more answer 503 at once,
#: so that a Redis that is down or slow cannot make the relay pile up callers without bound.
MAX_PENDING = 10_000
#: How many stale limit-set members one pair creation re-checks at most, so that the script stays short.
PRUNE_BATCH = 100
#: How many more batches a pair creation that would be refused at a limit re-checks before it refuses.
PRUNE_ROUNDS = 10

# Per-pair scripts: KEYS = {pair, seen}; ARGV[1] = now (epoch s), ARGV[2] = TTL (ms), then the operation's own.
_TOUCH = """
local function touch()
  redis.call('HSET', KEYS[1], 'used', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
"""

# Zero the bits lo..hi of the replay bitmap: whole bytes with one SETRANGE, only the edge bits one by one (at most 14
# with a window that is a multiple of 8; a bit a time would cost up to a window of commands, all blocking Redis).
_CLEAR = """
local function clear(lo, hi)
  while lo <= hi and lo % 8 ~= 0 do redis.call('SETBIT', KEYS[2], lo, 0); lo = lo + 1 end
  while hi >= lo and hi % 8 ~= 7 do redis.call('SETBIT', KEYS[2], hi, 0); hi = hi - 1 end
  if lo <= hi then redis.call('SETRANGE', KEYS[2], lo / 8, string.rep('\\0', (hi - lo + 1) / 8)) end
end
"""

# ARGV[3] = counter or '' (no mark), ARGV[4] = window, ARGV[5] = the creation time the caller expects, or ''.
# Returns nil, 0 (the pair was created at another time: nothing marked), or {enc, state, ver, created, fresh}.
_LOAD = (
    _TOUCH
    + _CLEAR
    + """
local f = redis.call('HMGET', KEYS[1], 'enc', 'state', 'ver', 'created', 'hi')
if not f[1] then return false end
if ARGV[5] ~= '' and f[4] ~= ARGV[5] then return 0 end
local fresh = 1
if ARGV[3] ~= '' then
  local c, w, hi = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(f[5])
  if c > hi then
    if c - hi >= w then
      redis.call('DEL', KEYS[2])
    elseif c - hi > 1 then
      -- the bits of the counters skipped over still hold marks from a window ago
      local first, last = (hi + 1) % w, (c - 1) % w
      if first <= last then
        clear(first, last)
      else
        clear(first, w - 1)
        clear(0, last)
      end
    end
    redis.call('SETBIT', KEYS[2], c % w, 1)
    redis.call('HSET', KEYS[1], 'hi', ARGV[3])
  elseif hi - c >= w then
    fresh = 0
  else
    fresh = 1 - redis.call('SETBIT', KEYS[2], c % w, 1)
  end
end
touch()
return {f[1], f[2], f[3], f[4], fresh}
"""
)

# ARGV[3] = count. Returns nil, or the first counter.
_RESERVE = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local last = redis.call('HINCRBY', KEYS[1], 'ctr', ARGV[3])
touch()
return last - tonumber(ARGV[3])
"""
)

# ARGV[3] = expected version, ARGV[4] = new state, ARGV[5] = the creation time the caller expects, or ''.
# Returns nil, -1 (the pair was created at another time), 0 (lost) or 1 (swapped).
_SWAP = (
    _TOUCH
    + """
local v = redis.call('HGET', KEYS[1], 'ver')
if not v then return false end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'created') ~= ARGV[5] then return -1 end
if v ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'ver', 1)
touch()
return 1
"""
)

# Limit-set scripts: KEYS[1] = client set, KEYS[2] = all pairs; ARGV[1] = prefix.
_PRUNE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function prune(zkey)
  local stale = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, %d)
  for _, m in ipairs(stale) do
    local client = ARGV[1] .. 'client:{' .. string.match(m, '^[^:]*') .. '}'
    local ttl = redis.call('PTTL', ARGV[1] .. 'pair:{' .. m .. '}')
    if ttl == -2 then
      redis.call('ZREM', KEYS[2], m)
      redis.call('ZREM', client, m)
    else
      redis.call('ZADD', KEYS[2], now + ttl, m)
      redis.call('ZADD', client, now + ttl, m)
    end
  end
  return #stale
end
-- Prune until the set is under ``limit`` or has no stale hint left (bounded: a set of live pairs is not rescanned).
local function prune_for(zkey, limit)
  for _ = 1, %d do
    if redis.call('ZCARD', zkey) < limit or prune(zkey) == 0 then return end
  end
end
""" % (
    PRUNE_BATCH,
    PRUNE_ROUNDS,
)

# KEYS[3] = pair, KEYS[4] = seen; ARGV[2] = tag, ARGV[3] = TTL (ms), ARGV[4] = per client, ARGV[5] = total,
# ARGV[6..10] = enc, state, ver, created, used. Returns 1, or -1 / -2 for the per-client / total limit.
_CREATE = (
    _PRUNE
    + """
prune(KEYS[1])
prune(KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 0 then
  prune_for(KEYS[1], tonumber(ARGV[4]))
  prune_for(KEYS[2], tonumber(ARGV[5]))
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -2 end
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[3], 'enc', ARGV[6], 'state', ARGV[7], 'ver', ARGV[8], 'created', ARGV[9], 'used', ARGV[10],
  'ctr', 0, 'hi', -1)
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local expiry = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
redis.call('ZADD', KEYS[2], expiry, ARGV[2])
return 1
"""
)

_COUNT = (
    _PRUNE
    + """
prune(KEYS[1])
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS[3] = pair, KEYS[4] = seen; ARGV[2] = tag.
_DELETE = """
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


class _ReconnectingFactory(txredisapi.RedisFactory):
    """
    txredisapi stops reconnecting for good when AUTH or SELECT fails on a new connection, and any passing failure
    there (maxclients reached, a reset during the handshake) then leaves the relay without Redis until restarted.
    Here such a connection is only closed, and reconnects with the usual backoff; ``disconnect`` still stops all.

    txredisapi's ``deferred`` fires at most once, and never once a first login failed, even if a later one succeeds:
    ``on_connection()`` is called instead for every connection that joins the pool, ``on_refusal(why)`` for every
    refused login.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_connection = lambda: None
        self.on_refusal = lambda why: None

    def stopTrying(self):
        return defer.succeed(None)

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool:  # not if it was closed before it could join
            self.on_connection()

    def connectionError(self, why):
        self.on_refusal(why)


#: Replies of a server that is no longer (or not yet) the primary.
_DEMOTED = ("READONLY", "MASTERDOWN")

#: What a Redis that is down, restarting or refusing us looks like; all of it is answered 503.
_UNAVAILABLE = (
    txredisapi.RedisError,
    defer.TimeoutError,
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
)


@attrs.frozen
class RedisAddress:
    """Where a Redis server is, parsed from a REDIS_URL. The password never shows in a repr."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_url(cls, url):
        """
        Parse ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) and the unix socket forms
        ``unix://[[user]:password@]/path[?db=N]`` and ``redis+unix://``; ``?db=N`` and ``?password=`` work for all.
        What would otherwise be ignored or replaced (another query parameter, a user without a password, port 0) is
        refused. The errors never quote the URL, which may hold a password.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix", "redis+unix"):
            raise ValueError("REDIS_URL must start with redis://, rediss://, unix:// or redis+unix://")
        tcp = parts.scheme in ("redis", "rediss")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if not query.keys() <= {"db", "password"}:
            raise ValueError("REDIS_URL: db and password are the only query parameters read")
        db = query.get("db")
        if tcp:
            db = db or parts.path.strip("/")
        if db and not (db.isascii() and db.isdigit()):  # int() would take "-1", " 1" and "1_0"
            raise ValueError("REDIS_URL: the db number must be a non-negative integer")
        try:
            port = parts.port  # raises on a port that is not a number or is beyond 65535
            if port == 0:
                raise ValueError
        except ValueError:
            raise ValueError("REDIS_URL: the port must be a number from 1 to 65535") from None
        password = unquote(parts.password) if parts.password else (query.get("password") or None)
        if parts.username and password is None:
            # Redis authenticates a user only with a password: the user would be ignored.
            raise ValueError("REDIS_URL: a user needs a password (user:password@)")
        common = dict(
            db=int(db) if db else None,
            username=unquote(parts.username) if parts.username else None,
            password=password,
        )
        if tcp:
            if not parts.hostname:
                raise ValueError("REDIS_URL names no host")
            return cls(host=parts.hostname, port=6379 if port is None else port, tls=parts.scheme == "rediss", **common)
        if not parts.path:
            raise ValueError("REDIS_URL names no socket path")
        return cls(path=unquote(parts.path), **common)

    def endpoint(self, reactor, connect_timeout, tls_options=None):
        """A client endpoint for this address; TLS checks the server's certificate against ``tls_options``."""
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=connect_timeout)
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=connect_timeout)
        if self.tls:
            endpoint = wrapClientTLS(tls_options or optionsForClientTLS(self.host), endpoint)
        return endpoint


def _stamp(created):
    """
    A pair's creation time as stored and compared in Redis (one spelling for an int and its float); ``''`` (no check)
    for None.
    """
    return "" if created is None else repr(float(created))


def _tag(client_id, pair_id):
    return f"{quote(client_id, safe='')}:{quote(pair_id, safe='')}"


@implementer(IRegistry)
class RedisRegistry(Service):
    """
    A registry in Redis, shared by relay processes; build it with ``from_url``.

    Each operation fails with ``RegistryUnavailable`` within ``timeout`` seconds when Redis is down or slow (at once
    while the connection is known to be lost); txredisapi reconnects in the background, with a backoff between
    ``reconnect_delay`` and ``max_reconnect_delay`` seconds. ``stopService`` closes the connections.
    """

    log = Logger()

    def __init__(
        self,
        factory,
        clock,
        pair_ttl=DEFAULT_PAIR_TTL,
        timeout=DEFAULT_TIMEOUT,
        max_pairs_per_client=DEFAULT_MAX_PAIRS_PER_CLIENT,
        max_pairs_total=DEFAULT_MAX_PAIRS_TOTAL,
        key_prefix=DEFAULT_PREFIX,
        pair_cache_seconds=DEFAULT_PAIR_CACHE_SECONDS,
        pair_cache_size=DEFAULT_PAIR_CACHE_SIZE,
    ):
        self.pair_ttl = pair_ttl
        self.timeout = timeout
        self._factory = factory
        self._redis = factory.handler
        self._clock = clock
        self._max_per_client = max_pairs_per_client
        self._max_total = max_pairs_total
        self._prefix = key_prefix
        # (client id, pair id) -> (fetched at, PairRecord) for MKE pairs: see get_pair.
        self._cache = OrderedDict()
        self._cache_seconds = min(pair_cache_seconds, pair_ttl / 2) if pair_cache_size > 0 else 0
        self._cache_size = pair_cache_size
        # (client id, pair id) -> a token of the newest get_pair reading the pair from Redis, until it ends; forget
        # drops it, so that a read under way when this process changed the pair keeps no copy from before the change.
        # As bounded as the reads in flight.
        self._reading = {}
        # Copies also expire while no request reads them.
        self._sweep = task.LoopingCall(lambda: self._expire(clock.seconds()))
        self._sweep.clock = clock
        self._connected_once = False
        self._waiting = []
        self._pending = 0
        self._queued = 0
        # An outage fails every request: its warning is logged at most once a second, with the count since, and the
        # first answer after it is logged too.
        self._warned_at = None
        self._unwarned = 0
        self._outage = False
        #: Where ``startService`` connects (set by ``from_url``).
        self.endpoint = None
        factory.on_connection = self._connected
        factory.on_refusal = self._refused

    @classmethod
    def from_url(
        cls,
        url,
        clock,
        reactor=None,
        *,
        poolsize=2,
        timeout=DEFAULT_TIMEOUT,
        tls_options=None,
        reconnect_delay=0.5,
        max_reconnect_delay=5.0,
        **kwargs,
    ):
        """
        The registry for the Redis at ``url`` (see ``RedisAddress.from_url``); it connects when started
        (``startService``), so that nothing touches the network before the service runs.

        ``clock`` times the operations and stamps the records; ``reactor`` (default: ``clock``) makes the
        connections. ``tls_options`` (an ``IOpenSSLClientConnectionCreator``) replaces the default check of a
        ``rediss://`` server's certificate against the system's trust roots. ``kwargs`` go to the constructor.
        """
        address = RedisAddress.from_url(url)
        factory = _ReconnectingFactory(
            address.path or f"{address.host}:{address.port}",
            address.db,
            poolsize,
            isLazy=True,
            # Raw bytes: the codec state is binary, and must never be read as a number.
            charset=None,
            convertNumbers=False,
            password=address.password,
            username=address.username,
            replyTimeout=timeout,
        )
        factory.initialDelay = reconnect_delay
        factory.maxDelay = max_reconnect_delay
        registry = cls(factory, clock, timeout=timeout, **kwargs)
        registry.endpoint = address.endpoint(reactor or clock, timeout, tls_options)
        return registry

    def _connected(self):
        if self._connected_once:
            return
        self._connected_once = True
        self._queued = 0
        self.log.info("Connected to Redis")
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        self._check_eviction()

    def _check_eviction(self):
        """
        Warn when Redis may evict keys: it could drop a pair's replay marks while the pair stays, and a recorded MKE
        request would then be taken again (see the trust model in docs/protocol.rst).
        """
        d = self._redis.execute_command("CONFIG", "GET", "maxmemory-policy")
        d.addTimeout(self.timeout, self._clock)

        def checked(reply):
            values = list(reply.values()) if isinstance(reply, dict) else list(reply)[1::2]
            policy = values[0].decode("ascii", "replace") if values else "unknown"
            if policy == "noeviction":
                self.log.debug("Redis's maxmemory-policy is noeviction")
            else:
                self.log.warn(
                    "Redis's maxmemory-policy is {policy}, not noeviction: once full it may evict a pair's replay"
                    " marks, and a recorded request would be taken again",
                    policy=policy,
                )

        def unknown(failure):
            # Managed services often refuse CONFIG. (A timeout's own message is only its arguments.)
            timed_out = failure.check(defer.TimeoutError)
            why = f"no answer within {self.timeout} s" if timed_out else failure.getErrorMessage()
            self.log.info(
                "Could not read Redis's maxmemory-policy ({why}): it must be noeviction",
                why=why or failure.type.__name__,
            )

        d.addCallbacks(checked, unknown)

    def _refused(self, why):
        # Authentication or db selection failed (refused, or not answered in time): that connection closes and is
        # tried again after the backoff.
        self.log.error("Redis login (AUTH or SELECT) failed, trying again: {why}", why=why)

    def whenConnected(self):
        """A Deferred that fires once the first connection is up, or fails with RegistryUnavailable after timeout."""
        if self._connected_once:
            return defer.succeed(None)
        d = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        d.addTimeout(self.timeout, self._clock)
        return d.addErrback(self._unavailable)

    def startService(self):
        super().startService()
        if self._cache_seconds > 0:
            self._sweep.start(self._cache_seconds, now=False)
        self._factory.startConnecting(self.endpoint)

    def stopService(self):
        super().stopService()
        if self._sweep.running:
            self._sweep.stop()
        self._cache.clear()
        return self._factory.disconnect()

    def _unavailable(self, failure):
        failure.trap(*_UNAVAILABLE)
        if failure.check(defer.TimeoutError):
            # Its message is only its arguments: "(2.0, 'Deferred')".
            self._warn("Redis did not answer within {timeout} s", timeout=self.timeout)
        else:
            self._warn("Redis unavailable: {why}", why=failure.getErrorMessage() or failure.type.__name__)
        if str(failure.value).startswith(_DEMOTED):
            # A failover made this server a replica: reconnect, so the name is looked up again and finds the primary.
            for connection in list(self._factory.pool):
                connection.transport.loseConnection()
        raise RegistryUnavailable()

    def _warn(self, message, **fields):
        """Log ``message`` (a format of ``fields``), or only count it if the last warning is less than a second old."""
        self._outage = True
        now = self._clock.seconds()
        if self._warned_at is not None and now - self._warned_at < 1:
            self._unwarned += 1
            return
        self.log.warn(message + " ({more} more failures since the last warning)", more=self._unwarned, **fields)
        self._warned_at, self._unwarned = now, 0

    def _eval(self, script, keys, args):
        """Run ``script`` on Redis within ``timeout``; 503 when Redis cannot answer."""
        if not self._factory.size:
            if self._connected_once:
                # Lost every connection: answer at once instead of queueing callers until reconnection.
                self._warn("Redis unavailable: connection lost, reconnecting")
                return defer.fail(RegistryUnavailable("Redis connection lost; reconnecting"))
            # Before the first connection txredisapi queues commands (a timeout does not take them out): a bound.
            if self._queued >= MAX_PENDING:
                return defer.fail(RegistryUnavailable("Redis is not connected yet"))
            self._queued += 1
        if self._pending >= MAX_PENDING:
            self._warn("Redis unavailable: {count} commands already wait for it", count=MAX_PENDING)
            return defer.fail(RegistryUnavailable("too many operations wait for Redis"))
        self._pending += 1
        d = self._redis.eval(script, keys, args)
        d.addTimeout(self.timeout, self._clock)
        d.addBoth(self._done)
        return d.addCallbacks(self._answered, self._unavailable)

    def _done(self, result):
        self._pending -= 1
        return result

    def _answered(self, result):
        if self._outage:
            self._outage = False
            self.log.info("Redis answers again ({more} more failures since the last warning)", more=self._unwarned)
            self._warned_at, self._unwarned = None, 0
        return result

    def _pair_script(self, script, client_id, pair_id, *args):
        """Run a per-pair script; UnknownPair when the pair is absent (any copy of it is dropped)."""
        tag = _tag(client_id, pair_id)
        keys = [f"{self._prefix}pair:{{{tag}}}", f"{self._prefix}seen:{{{tag}}}"]
        d = self._eval(script, keys, [repr(self._clock.seconds()), self._ttl_ms(), *args])

        def check(result):
            if result is None:
                self.forget(client_id, pair_id)
                raise UnknownPair()
            return result

        return d.addCallback(check)

    def _limit_script(self, script, client_id, pair_id, *args):
        """Run a script on the limit sets (and the pair's keys, if a pair is given)."""
        keys = [f"{self._prefix}client:{{{quote(client_id, safe='')}}}", f"{self._prefix}pairs"]
        if pair_id is not None:
            tag = _tag(client_id, pair_id)
            keys += [f"{self._prefix}pair:{{{tag}}}", f"{self._prefix}seen:{{{tag}}}"]
        return self._eval(script, keys, [self._prefix, *args])

    def _ttl_ms(self):
        return max(1, int(self.pair_ttl * 1000))

    def create_pair(self, record):
        self.forget(record.client_id, record.pair_id)
        d = self._limit_script(
            _CREATE,
            record.client_id,
            record.pair_id,
            _tag(record.client_id, record.pair_id),
            self._ttl_ms(),
            self._max_per_client,
            self._max_total,
            record.encode_type,
            record.state,
            record.version,
            _stamp(record.created),
            repr(record.last_used),
        ).addBoth(self._changed, record.client_id, record.pair_id)

        def check(result):
            if result == -1:
                raise PairLimitExceeded("too many pairs for this client")
            if result == -2:
                raise PairLimitExceeded("too many pairs on this relay")

        return d.addCallback(check)

    def get_client(self, client_id):
        d = self._limit_script(_COUNT, client_id, None)
        return d.addCallback(lambda count: ClientRecord(client_id, count))

    def _load(self, client_id, pair_id, counter="", window="", created=""):
        d = self._pair_script(_LOAD, client_id, pair_id, counter, window, created)

        def record(result):
            if result == 0:
                self.forget(client_id, pair_id)
                raise UnknownPair("the pair was replaced")
            enc, state, version, created, fresh = result
            return (
                PairRecord(
                    client_id=client_id,
                    pair_id=pair_id,
                    encode_type=enc.decode("ascii"),
                    state=state,
                    version=int(version),
                    created=float(created),
                    last_used=self._clock.seconds(),
                ),
                fresh == 1,
            )

        return d.addCallback(record)

    def get_pair(self, client_id, pair_id):
        """
        The pair's record. An MKE pair is answered from the copy fetched less than ``pair_cache_seconds`` ago, when
        there is one: the relay's ``mark_seen`` goes to Redis anyway, so a relayed MKE message costs one round trip,
        not two. A sweep every ``pair_cache_seconds`` drops the expired copies, so none holds the state (its keys) in
        this process for more than twice that. A read under way at any time while this process changed the pair (or
        when it called ``forget``) keeps no copy: it may have fetched the pair from before the change.
        """
        key = (client_id, pair_id)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if self._fresh(cached[0], now):
                return defer.succeed(cached[1].used_at(now))
            del self._cache[key]

        token = self._reading[key] = object()

        def keep(loaded):
            record = loaded[0]
            if record.encode_type == "MKE" and self._cache_seconds > 0 and self._reading.get(key) is token:
                self._cache.pop(key, None)
                while len(self._cache) >= self._cache_size:
                    self._cache.popitem(last=False)
                self._cache[key] = (self._clock.seconds(), record)
            return record

        def done(result):
            if self._reading.get(key) is token:
                del self._reading[key]
            return result

        return self._load(client_id, pair_id).addCallback(keep).addBoth(done)

    def _fresh(self, fetched, now):
        # A clock that went back also ends a copy's life: its age is then unknown.
        return 0 <= now - fetched < self._cache_seconds

    def _expire(self, now):
        """Drop the copies fetched ``pair_cache_seconds`` ago or more: kept in fetch order, the oldest go first."""
        cache = self._cache
        while cache and not self._fresh(next(iter(cache.values()))[0], now):
            cache.popitem(last=False)

    def forget(self, client_id, pair_id):
        self._reading.pop((client_id, pair_id), None)
        return self._cache.pop((client_id, pair_id), None) is not None

    def _changed(self, result, client_id, pair_id):
        # A change of the pair forgets it before it is sent and again once Redis answered: a read sent meanwhile on
        # another connection may have reached Redis first, and kept a copy from before the change.
        self.forget(client_id, pair_id)
        return result

    def mark_seen(self, client_id, pair_id, counter, window, created=None):
        return (
            defer.maybeDeferred(check_mark_args, counter, window)
            .addCallback(lambda _: self._load(client_id, pair_id, counter, window, _stamp(created)))
            .addCallback(lambda loaded: loaded[1])
        )

    def reserve_counters(self, client_id, pair_id, count=1):
        return defer.maybeDeferred(check_count, count).addCallback(
            lambda _: self._pair_script(_RESERVE, client_id, pair_id, count)
        )

    def swap_state(self, client_id, pair_id, expected_version, new_state, created=None):
        # Whoever wins, the state changes: the next get_pair fetches it.
        self.forget(client_id, pair_id)
        d = self._pair_script(_SWAP, client_id, pair_id, int(expected_version), new_state, _stamp(created))
        d.addBoth(self._changed, client_id, pair_id)

        def check(result):
            if result == -1:
                raise UnknownPair("the pair was replaced")
            return result == 1

        return d.addCallback(check)

    def delete_pair(self, client_id, pair_id):
        self.forget(client_id, pair_id)
        d = self._limit_script(_DELETE, client_id, pair_id, _tag(client_id, pair_id))
        return d.addBoth(self._changed, client_id, pair_id).addCallback(lambda _: None)
