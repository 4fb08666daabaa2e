"""User features in memcached: the key scheme, the serde, and a per-worker client.

One ``get_many`` per bid request fetches every id the request carries
(``user.buyeruid``, ``user.id``, ``device.ifa``); the first hit wins. Values are
msgpack arrays (``UserFeatures`` as ``array_like``): compact, schema-checked on
decode, no pickle. A server is ``HOST:PORT`` or, co-located, ``unix:/path.sock``.
A fault (refused, timed out, garbage) answers with default features, and that
server is left alone for ``retry_ms``, its keys unknown meanwhile (never re-homed
to another server): the bid is still answered in time. Only what a server or the
network can do counts as a fault (``FAULTS``); a bug raises. Billed impressions
whose frequency counter cannot be written meanwhile are kept and written once
memcached answers (at least once: a timed-out write memcached did apply counts
twice, toward fewer impressions).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections import deque
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec
from pymemcache.client.base import Client
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError, MemcacheUnknownError
from pymemcache.serde import FLAG_BYTES, FLAG_INTEGER, FLAG_PICKLE

from bidder import metrics
from bidder.logs import FaultLog

log = logging.getLogger("bidder.featurestore")
faults = FaultLog(log)

KEY_PREFIX = "u:"
UNWRITTEN_MAX = 10_000  # billed impressions kept per worker while memcached cannot count them
REPLAY_PER_CALL = 2  # kept impressions written per look-up or notice once it answers again
AFTER_LOOKUP_S = 0.005  # what scoring and answering need after a look-up, kept free of it
PROBE_KEY = "readyz-probe"  # read by /readyz when no look-up reached memcached lately
STATUS_FRESH_S = 5.0
MEMCACHED_RELATIVE_MAX_S = 30 * 86400  # a longer exptime is an absolute Unix time to memcached
MAX_PLAIN_ID = 200  # memcached keys are at most 250 bytes of printable ASCII without spaces
MAX_KEY = 250
UNIX_PREFIX = "unix:"
RECV_SIZE = 65536  # a look-up's answer (a few users' segments and counters) fits one read
# What a memcached server or the network can do to a call (refused, reset, timed out, an
# answer that is not memcached's protocol, a server error): the server is marked down. Any
# other exception is a bug of ours and propagates.
FAULTS = (MemcacheError, OSError)


class UserFeatures(msgspec.Struct, array_like=True, omit_defaults=True):
    segments: list[int] = []


DEFAULT_FEATURES = UserFeatures()
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(UserFeatures)


# Counters written before the flags followed pymemcache.serde said 1, which is its FLAG_PICKLE;
# no value of ours was ever a pickle, so 1 is read as a counter (an upgrade keeps the caps).
LEGACY_COUNTER_FLAGS = (FLAG_PICKLE,)


class UserFeaturesSerde:
    """pymemcache serde: ``UserFeatures`` <-> msgpack bytes (``FLAG_BYTES``); frequency counters
    as ASCII ints (``FLAG_INTEGER``, the form memcached's ``incr`` works on), the flags
    ``pymemcache.serde`` gives them, so a stock pymemcache client reads them the same way."""

    def serialize(self, key: bytes | str, value: UserFeatures | int) -> tuple[bytes, int]:
        if isinstance(value, int):
            return str(value).encode(), FLAG_INTEGER
        return _ENCODER.encode(value), FLAG_BYTES

    def deserialize(self, key: bytes | str, value: bytes, flags: int) -> UserFeatures | int | None:
        try:
            if flags == FLAG_INTEGER or flags in LEGACY_COUNTER_FLAGS:
                return int(value)
            return _DECODER.decode(value)
        except (msgspec.DecodeError, ValueError):
            faults.warning(f"undecodable {flags}", "undecodable value in memcached (flags %d): "
                           "ignored, the user gets default features", flags)
            return None


class Crc32Rendezvous(RendezvousHash):
    """HashClient's rendezvous hashing with zlib's C crc32 instead of pure-Python murmur3,
    which cost ~5 % of a worker's CPU per look-up key (measured with py-spy)."""

    def __init__(self) -> None:
        super().__init__(hash_function=lambda text, seed: zlib.crc32(text.encode()))


def user_key(user_id: str) -> str:
    """The memcached key of a user id; ids that are not safe keys are hashed."""
    if len(user_id) <= MAX_PLAIN_ID and user_id.isascii() and user_id.isprintable() \
            and " " not in user_id:
        return KEY_PREFIX + user_id
    return "u#" + hashlib.blake2b(user_id.encode(), digest_size=16).hexdigest()


def frequency_key(campaign_id: str, user_key_: str) -> str:
    """Counter of billed impressions of one campaign to one user."""
    return f"f:{campaign_id}:{_user_digest(user_key_)}"


def pending_key(campaign_id: str, user_key_: str) -> str:
    """Counter of one campaign's bids to one user still waiting for their billing or loss
    notice: a bid counts against the cap while it is in flight."""
    return f"p:{campaign_id}:{_user_digest(user_key_)}"


@lru_cache(maxsize=4096)
def _user_digest(user_key_: str) -> str:
    """One hash per user, however many capped campaigns a request asks about."""
    return hashlib.blake2b(user_key_.encode(), digest_size=12).hexdigest()


def memcached_expiry(window_s: int) -> int:
    """memcached's exptime for an item that lives ``window_s`` from now: memcached reads a
    value over 30 days as a Unix time, so a 31-day window given as is expired at once."""
    if window_s <= MEMCACHED_RELATIVE_MAX_S:
        return window_s
    return int(time.time()) + window_s


Server = tuple[str, int] | str  # (host, port), or the path of a Unix socket


def parse_servers(spec: str) -> list[Server]:
    """``host:port[,host:port]`` -> [(host, port)], ``unix:PATH`` -> absolute PATH (pymemcache's
    server forms); ``none`` or empty -> []."""
    if not spec or spec.strip().lower() == "none":
        return []
    servers: list[Server] = []
    for item in spec.split(","):
        item = item.strip()
        if item.startswith(UNIX_PREFIX):
            path = item[len(UNIX_PREFIX):]
            if not path:
                raise ValueError(f"memcached server {item!r}: write a Unix socket as unix:PATH, "
                                 "e.g. unix:/run/memcached/memcached.sock")
            servers.append(os.path.abspath(path))  # the seeder and the server name it alike
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"memcached server {item!r}: write it as HOST:PORT, e.g. "
                             "127.0.0.1:11211, or unix:PATH for a Unix socket")
        servers.append((host.strip("[]"), int(port)))
    return servers


def server_name(server: Server) -> str:
    """The node name pymemcache's HashClient (the seeder) gives a server: rendezvous hashing
    ranks these names, so the bidder must use the same ones."""
    return server if isinstance(server, str) else f"{server[0]}:{server[1]}"


def check_keys(keys: list[str]) -> str:
    """``keys`` joined by spaces, or ValueError (a bug of ours, not a server fault) when one is
    not a memcached key: printable ASCII without spaces, at most 250 bytes."""
    line = " ".join(keys)
    if (not line.isascii() or not line.isprintable() or len(line.split()) != len(keys)
            or max(map(len, keys)) > MAX_KEY):
        raise ValueError(f"not memcached keys (printable ASCII, no spaces, <= {MAX_KEY} "
                         f"bytes): {keys!r}")
    return line


class LookupClient(Client):
    """pymemcache's ``Client`` with a lean ``get_many`` for the bid path.

    pymemcache's own checks each key (encode, split, prefix), maps keys back through a dict
    and reads the answer line by line through lists of chunks: about half of a look-up's
    Python time on loopback. Here the keys come from ``user_key`` and ``frequency_key``
    (printable ASCII, no spaces, at most 250 bytes; checked in one pass over the command),
    the command is one ``write`` on the connected socket (no ``poll`` first: its buffer is
    empty between look-ups) and the answer is parsed in place, usually from one ``recv``.
    The socket keeps pymemcache's explicit connect and read timeouts, values go through the
    client's serde, and any fault closes the connection (its state is unknown) and raises.
    Everything else (connect, ``add``, ``incr``, ``get``) is pymemcache's.
    """

    def get_many(self, keys: list[str]) -> dict[str, Any]:  # type: ignore[override]
        if not keys:
            return {}
        command = "get " + check_keys(keys)
        if self.sock is None:
            self._connect()
        sock = self.sock
        try:
            data = (command + "\r\n").encode()
            sent = os.write(sock.fileno(), data)  # non-blocking fd: never waits
            if sent < len(data):
                sock.sendall(data[sent:])  # a full send buffer: wait, under the timeout
            return self._read_values(sock)
        except BaseException:
            self.close()
            raise

    def _read_values(self, sock) -> dict[str, Any]:
        """``VALUE key flags bytes\\r\\n<data>\\r\\n`` ... ``END\\r\\n`` -> {key: deserialized}."""
        buf = sock.recv(RECV_SIZE)
        found: dict[str, Any] = {}
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                buf = self._more(sock, buf)
                continue
            if buf.startswith(b"VALUE ", pos):
                try:
                    _, key, flags, size = buf[pos:eol].split()
                    name, flag, end = key.decode("ascii"), int(flags), eol + 2 + int(size)
                except ValueError:  # not 4 fields, not numbers, not ASCII
                    raise MemcacheUnknownError(buf[pos:eol][:64]) from None
                if end < eol + 2:
                    raise MemcacheUnknownError(buf[pos:eol][:64])
                while len(buf) < end + 2:
                    buf = self._more(sock, buf)
                if buf[end:end + 2] != b"\r\n":
                    raise MemcacheUnknownError(b"value not followed by CRLF")
                found[name] = self.serde.deserialize(name, buf[eol + 2:end], flag)
                pos = end + 2
            elif eol == pos + 3 and buf.startswith(b"END", pos):
                if eol + 2 != len(buf):
                    raise MemcacheUnknownError(b"bytes after END")
                return found
            else:
                self._raise_errors(buf[pos:eol], b"get")
                raise MemcacheUnknownError(buf[pos:eol][:64])

    @staticmethod
    def _more(sock, buf: bytes) -> bytes:
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        return buf + chunk


class Shard:
    """One memcached server: its client and, after a fault, when to try it again."""

    def __init__(self, server: Server, options: dict) -> None:
        self.name = server_name(server)
        self.client = LookupClient(server, **options)
        self.down_until = 0.0

    def down(self, now: float) -> bool:
        return now < self.down_until


class Prefetched(NamedTuple):
    """What :meth:`FeatureStore.prefetch` read for one poll's requests."""

    asked: frozenset[str]
    found: dict[str, Any]
    unknown: frozenset[str]  # their server was down or failed: counts unknown
    faults: int


class FeatureStore:
    """Per-thread memcached access (create it after fork: sockets are not shared).

    Keys go to servers by the seeder's rendezvous hashing over a fixed ring: a server that
    fails is left alone for ``retry_ms`` and its keys are *unknown* meanwhile, never read from
    another server (where a frequency counter would read 0 and let a capped user through, and
    a billed impression would be counted where nobody reads it once the server is back).
    """

    def __init__(self, servers: list[Server], connect_timeout_ms: float,
                 timeout_ms: float, retry_ms: float,
                 unwritten: deque[tuple[str, int]] | None = None) -> None:
        self.servers = servers
        self.timeout_s = timeout_ms / 1000.0
        self.retry_s = retry_ms / 1000.0
        self.last_error: str | None = None
        self.client_options = dict(serde=UserFeaturesSerde(),
                                   connect_timeout=connect_timeout_ms / 1000.0,
                                   timeout=timeout_ms / 1000.0, no_delay=True,
                                   default_noreply=False)
        self.shards = {shard.name: shard
                       for shard in (Shard(s, self.client_options) for s in servers)}
        self._ring = Crc32Rendezvous()
        for name in self.shards:
            self._ring.add_node(name)
        self._only = next(iter(self.shards.values())) if len(self.shards) == 1 else None
        self._answered_at = float("-inf")  # when memcached last answered
        self._prefetched: Prefetched | None = None  # this poll's look-ups, read at once
        # billed impressions whose counter could not be written, replayed once memcached answers:
        # shared by the stores of one process's threads, so whichever sees it answer writes them
        self._unwritten = deque(maxlen=UNWRITTEN_MAX) if unwritten is None else unwritten

    def shard_of(self, key: str) -> Shard:
        return self._only or self.shards[self._ring.get_node(key)]

    def lookup(self, user_keys: list[str], counter_keys: list[str],
               time_left_s: float) -> tuple[UserFeatures, dict[str, int | None] | None]:
        """Features of the first user key found, and the frequency counters: a count, absent
        when 0, ``None`` when unknown (its server failed), so capped campaigns must not bid.

        Default features on a miss; default features and ``None`` for all counters on a fault
        of every server asked, or when less than a timeout and ``AFTER_LOOKUP_S`` is left.
        """
        if not user_keys or not self._may_read(time_left_s):
            metrics.tally.inc(metrics.child(metrics.FEATURE_STORE, "skipped"))
            return DEFAULT_FEATURES, None
        keys = user_keys + counter_keys
        batch = self._prefetched
        if batch is not None and batch.asked.issuperset(keys):
            found, unknown = batch.found, [k for k in keys if k in batch.unknown]
            faults = batch.faults if unknown else 0
        else:
            batch = None
            found, unknown, faults = self._get_many(keys)
        if len(unknown) == len(keys):  # nothing answered
            outcome = "error" if faults else "skipped"
            metrics.tally.inc(metrics.child(metrics.FEATURE_STORE, outcome))
            return DEFAULT_FEATURES, None
        if batch is None:
            self._answered()
        counters: dict[str, int | None] = {k: found[k] for k in counter_keys
                                           if isinstance(found.get(k), int)}
        counters.update((k, None) for k in unknown if k in counter_keys)
        for key in user_keys:
            features = found.get(key)
            if isinstance(features, UserFeatures):
                metrics.tally.inc(metrics.child(metrics.FEATURE_STORE, "hit"))
                return features, counters
        metrics.tally.inc(metrics.child(metrics.FEATURE_STORE, "error" if faults else "miss"))
        return DEFAULT_FEATURES, counters

    def prefetch(self, keys: list[str], time_left_s: float) -> None:
        """Read ``keys``, the look-ups of several requests about to be handled one after
        another (a worker's poll), in one round trip per server: each ``lookup`` whose keys
        were all asked is then answered from it, until ``forget_prefetched``. Per request,
        a round trip costs the worker two system calls and a context switch (it sleeps until
        memcached answers), and memcached a wake-up: on a busy host, more than the parsing.
        Nothing is read when a lookup would skip it (no time left)."""
        self._prefetched = None
        if not keys or not self._may_read(time_left_s):
            return
        found, unknown, faults = self._get_many(keys)
        if len(unknown) < len(keys):
            self._answered()
        self._prefetched = Prefetched(frozenset(keys), found, frozenset(unknown), faults)

    def _may_read(self, time_left_s: float) -> bool:
        """Whether a read may go to memcached: there is one, and a time-out still leaves
        ``AFTER_LOOKUP_S`` of the ``time_left_s`` for the rest of the bid."""
        return bool(self.shards) and time_left_s >= self.timeout_s + AFTER_LOOKUP_S

    def forget_prefetched(self) -> None:
        """The requests the prefetch was for are handled: later look-ups read memcached."""
        self._prefetched = None

    def _get_many(self, keys: list[str]) -> tuple[dict, list[str], int]:
        """``keys`` from their servers: (found values, keys unknown because their server is
        down or failed now, failures)."""
        if self._only is not None:
            groups = {self._only.name: keys}
        else:
            groups = {}
            for key in keys:
                groups.setdefault(self._ring.get_node(key), []).append(key)
        now = time.monotonic()
        found: dict = {}
        unknown: list[str] = []
        faults = 0
        for name, group in groups.items():
            shard = self.shards[name]
            if shard.down(now):
                unknown += group
                continue
            metrics.tally.inc(metrics.FEATURE_STORE_READS)
            try:
                found.update(shard.client.get_many(group))
            except FAULTS as exc:  # refused, timeout, protocol error: all degrade the same way
                self._failed(shard, exc)
                unknown += group
                faults += 1
        return found, unknown, faults

    def count_impression(self, key: str, window_s: int) -> None:
        """Add one billed impression to a frequency counter that expires after ``window_s``.

        While its server is down the impression is kept (up to UNWRITTEN_MAX per process) and
        written once memcached answers again, so an outage does not reset caps; no write is
        tried before the server's retry time (each would cost a timeout on this thread).
        """
        if not self.shards:
            return
        check_keys([key])  # a bad key is a bug: it must raise, not mark the server down
        shard = self.shard_of(key)
        if shard.down(time.monotonic()):
            self._keep_unwritten(key, window_s)
            return
        try:
            self._increment(shard, key, window_s)
        except FAULTS as exc:
            self._keep_unwritten(key, window_s)
            self._failed(shard, exc)
            return
        self._replay(REPLAY_PER_CALL)

    def reserve_pending(self, key: str, ttl_s: int, exists: bool) -> None:
        """Count one bid in flight (bid path: one noreply write, nothing is waited for):
        ``incr`` a counter the look-up found (``exists``), else ``add`` it at 1, to live
        ``ttl_s``. Two first bids racing lose one count; a fault loses the reservation.
        A prefetched count is kept current: a later request of the same poll sees this bid."""
        batch = self._prefetched
        if batch is not None and key in batch.asked and key not in batch.unknown:
            batch.found[key] = (batch.found.get(key) or 0) + 1
        shard = self._only or (self.shard_of(key) if self.shards else None)
        if shard is None or shard.down(time.monotonic()):
            return
        check_keys([key])  # a bad key is a bug: it must raise, not mark the server down
        try:
            if exists:
                shard.client.incr(key, 1, noreply=True)
            else:
                shard.client.add(key, 1, expire=ttl_s, noreply=True)
        except FAULTS as exc:
            self._failed(shard, exc)

    def release_pending(self, key: str) -> None:
        """A bid in flight was billed or lost: one fewer pending (never below 0). Called on
        the notice path, so it waits for memcached's answer: once the notice is answered,
        the user's next bid request sees the release, whichever connection reads it."""
        shard = self.shard_of(key) if self.shards else None
        if shard is None or shard.down(time.monotonic()):
            return
        check_keys([key])
        try:
            shard.client.decr(key, 1, noreply=False)
        except FAULTS as exc:
            self._failed(shard, exc)

    @staticmethod
    def _increment(shard: Shard, key: str, window_s: int) -> None:
        shard.client.add(key, 0, expire=memcached_expiry(window_s), noreply=False)
        shard.client.incr(key, 1, noreply=False)

    def _keep_unwritten(self, key: str, window_s: int) -> None:
        if len(self._unwritten) == UNWRITTEN_MAX:
            log.warning("frequency counts not written to memcached exceed %d: the oldest is "
                        "dropped and its cap may let one more through", UNWRITTEN_MAX)
        self._unwritten.append((key, window_s))

    def _replay(self, limit: int) -> None:
        """Write up to ``limit`` kept impressions (a few per call: the bid thread runs this)."""
        now = time.monotonic()
        for _ in range(limit):
            try:
                key, window_s = self._unwritten.popleft()  # atomic: no other thread writes it too
            except IndexError:
                return
            shard = self.shard_of(key)
            if shard.down(now):
                self._unwritten.appendleft((key, window_s))
                return
            try:
                self._increment(shard, key, window_s)
            except FAULTS as exc:
                self._unwritten.appendleft((key, window_s))
                self._failed(shard, exc)
                return

    def _failed(self, shard: Shard, exc: BaseException) -> None:
        shard.down_until = time.monotonic() + self.retry_s
        if self.last_error is None:
            log.warning("memcached %s failed (%s: %s): its users get default features, its "
                        "frequency counts are unknown and billed impressions are kept for them, "
                        "until it answers (retried every %.0f ms)", shard.name,
                        type(exc).__name__, exc, self.retry_s * 1000)
        self.last_error = f"{shard.name}: {type(exc).__name__}: {exc}"

    def _answered(self) -> None:
        self._answered_at = time.monotonic()
        if self._unwritten:
            self._replay(REPLAY_PER_CALL)
        if self.last_error is not None and not any(
                s.down(self._answered_at) for s in self.shards.values()):
            log.info("memcached %s answers again", [s.name for s in self.shards.values()])
            self.last_error = None

    def status(self) -> dict:
        """For ``/readyz``: memcached as last seen, probed first when no look-up reached it
        lately (so a server that never answered is not reported ok)."""
        if not self.shards:
            return {"ok": True, "servers": [], "note": "no feature store configured"}
        now = time.monotonic()
        if now - self._answered_at > STATUS_FRESH_S:
            for shard in self.shards.values():
                if not shard.down(now):
                    try:
                        shard.client.get(PROBE_KEY)
                    except FAULTS as exc:
                        self._failed(shard, exc)
            if not any(s.down(now) for s in self.shards.values()):
                self._answered()
        return {"ok": self.last_error is None, "servers": list(self.shards),
                "last_error": self.last_error}
