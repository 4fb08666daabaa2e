"""Signed win (``nurl``), billing (``burl``) and loss (``lurl``) notice URLs, and reading them back.

A notice URL carries what the ledger needs (bid, imp, campaign, creative, user, currency, test
flag, our bid price, the worker whose budget lease the bid reserved, when it was issued and the
id of the key that signed it) and a keyed BLAKE2b MAC over those values and the notice kind,
so a forged or edited notice is refused instead of booked, and one older than the notice
lifetime (``--notice-ttl-s``) is refused as expired. The exchange substitutes
``${AUCTION_PRICE}`` with the clearing price (and ``${AUCTION_LOSS}`` with a loss reason).

Keys rotate without downtime: ``--notice-secret`` signs, ``--notice-verify-secrets`` are
accepted as well when verifying; each notice names its key by id (a hash of the secret), so a
verifier picks the key at once.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from typing import NamedTuple
from urllib.parse import quote

import msgspec

PRICE_MACRO = "${AUCTION_PRICE}"
LOSS_MACRO = "${AUCTION_LOSS}"
# Exchanges may render the clearing price rounded (to cents, or whole yen): that is no reason to
# lose the notice. Above our bid by more than one minor unit of its currency (a cent CPM, a yen
# CPM), it is not our auction's price.
PRICE_TOLERANCE = 0.01
ROUNDING = 1e-9  # float rounding of the comparison itself
# ISO 4217 currencies without a minor unit: prices in them are rendered in whole units
WHOLE_UNIT_CURRENCIES = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split())
# b bid, i imp, c campaign, r creative, u user, cur currency, t test, bp bid price,
# h budget holder (worker), ts issued at (Unix s), k key id
SIGNED_FIELDS = ("b", "i", "c", "r", "u", "cur", "t", "bp", "h", "ts", "k")
KINDS = ("win", "billing", "loss")
DEFAULT_TTL_S = 48 * 3600
CLOCK_SKEW_S = 300  # a notice issued this far in the future (another host's clock) still counts
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~:-]*")  # no escaping needed: the common case, kept cheap


def _escape(value: str) -> str:
    return value if _URL_SAFE.fullmatch(value) else quote(value, safe="")


def key_id(secret: str) -> str:
    """The public id of a notice key: 8 hex digits of a hash of the secret."""
    return hashlib.blake2b(secret.encode(), digest_size=4, person=b"bidder-key-id").hexdigest()


def secrets_list(text: str) -> tuple[str, ...]:
    """``--notice-verify-secrets S1,S2`` as a tuple of secrets."""
    return tuple(part for part in (p.strip() for p in text.split(",")) if part)


class NoticeError(ValueError):
    """A notice that cannot be booked; the message says why."""


class NoticeExpired(NoticeError):
    """A notice signed longer ago than the notice lifetime."""


class NoticeUrls(NamedTuple):
    nurl: str
    burl: str
    lurl: str


class Verified(NamedTuple):
    fields: dict[str, str]  # SIGNED_FIELDS -> value
    price: float  # clearing price, in the notice's currency (0 for a loss without one)
    issued_at: float


class _Key:
    """One secret's MAC states, the one after '["kind",' kept per kind: a signature hashes
    only the values."""

    def __init__(self, secret: str) -> None:
        self.id = key_id(secret)
        key = hashlib.blake2b(secret.encode()).digest()[:64]  # any length -> <= 64 bytes
        # keyed BLAKE2b (a MAC by design, several times cheaper than HMAC-SHA256 here) over the
        # JSON array [kind, *values], unambiguous: no value can shift into another
        self.macs = {kind: hashlib.blake2b(b'["' + kind.encode() + b'",', key=key,
                                           digest_size=16) for kind in KINDS}

    def sign(self, kind: str, tail: memoryview) -> str:
        """The MAC of ``kind`` and the values whose JSON array, less its '[', is ``tail``."""
        mac = self.macs[kind].copy()
        mac.update(tail)
        return mac.hexdigest()


class NoticeSigner:
    def __init__(self, base_url: str, secret: str, verify_secrets: tuple[str, ...] = (),
                 ttl_s: float = DEFAULT_TTL_S, clock=time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = _Key(secret)
        self._keys = {k.id: k for k in (_Key(s) for s in verify_secrets)}
        self._keys[self._key.id] = self._key
        self.ttl_s = ttl_s
        self._clock = clock

    def urls(self, bid_id: str, imp_id: str, campaign: str, creative: str, user_key: str,
             currency: str, test: int, bid_price: float, holder: str) -> NoticeUrls:
        """(nurl, burl, lurl) for one bid, issued now."""
        key = self._key
        price, issued = repr(bid_price), str(int(self._clock()))
        values = (bid_id, imp_id, campaign, creative, user_key, currency, str(test), price,
                  holder, issued, key.id)
        # bid id, holder (hex), price, issued-at, test flag and key id are URL-safe as they are;
        # the others are too in the common case (then so is their concatenation)
        if not _URL_SAFE.fullmatch(imp_id + campaign + creative + user_key + currency):
            imp_id, campaign, creative, user_key, currency = map(
                _escape, (imp_id, campaign, creative, user_key, currency))
        query = (f"b={bid_id}&i={imp_id}&c={campaign}&r={creative}&u={user_key}&cur={currency}"
                 f"&t={test}&bp={price}&h={holder}&ts={issued}&k={key.id}")
        tail = memoryview(msgspec.json.encode(values))[1:]  # '"b",...]' follows '["kind",'
        base = self.base_url
        return NoticeUrls(
            f"{base}/notice/win?{query}&s={key.sign('win', tail)}&p={PRICE_MACRO}",
            f"{base}/notice/billing?{query}&s={key.sign('billing', tail)}&p={PRICE_MACRO}",
            f"{base}/notice/loss?{query}&s={key.sign('loss', tail)}&loss={LOSS_MACRO}"
            f"&p={PRICE_MACRO}")

    def verify(self, kind: str, params: dict[str, str]) -> Verified:
        """Check a notice's key, signature, age and price; return its fields and price."""
        missing = [k for k in SIGNED_FIELDS + ("s", "p") if k not in params]
        if missing:
            raise NoticeError(f"notice is missing parameter(s) {missing}: use the nurl/burl/lurl "
                              "exactly as the bid returned it")
        key = self._keys.get(params["k"])
        if key is None:
            raise NoticeError(f"notice is signed with key id {params['k']!r}, which this server "
                              "does not hold: during a key rotation add the other secret to "
                              "--notice-verify-secrets")
        values = tuple(params[k] for k in SIGNED_FIELDS)
        signature = params["s"]  # ours is hex; compare_digest raises on a non-ASCII str
        if not (signature.isascii() and hmac.compare_digest(
                key.sign(kind, memoryview(msgspec.json.encode(values))[1:]), signature)):
            raise NoticeError("notice signature does not match: the URL was altered or is not ours")
        issued_at = float(params["ts"])  # signed: it is the integer we wrote
        age = self._clock() - issued_at
        if age > self.ttl_s:
            raise NoticeExpired(f"notice was issued {age / 3600:.1f} h ago, past the notice "
                                f"lifetime of {self.ttl_s / 3600:g} h (--notice-ttl-s)")
        if age < -CLOCK_SKEW_S:
            raise NoticeError(f"notice is issued {-age:.0f} s in the future: check the clocks "
                              "of the bidder hosts (NTP)")
        price = self._price(kind, params)
        return Verified(dict(zip(SIGNED_FIELDS, values)), price, issued_at)

    @staticmethod
    def _price(kind: str, params: dict[str, str]) -> float:
        raw_price = params["p"]
        if raw_price == PRICE_MACRO:
            if kind == "loss":  # exchanges need not tell a loser the price
                return 0.0
            raise NoticeError("the ${AUCTION_PRICE} macro was not substituted with the clearing price")
        try:
            price = float(raw_price)
        except ValueError:
            raise NoticeError(f"clearing price {raw_price!r} is not a number") from None
        if not math.isfinite(price) or price < 0:
            raise NoticeError(f"clearing price {raw_price!r} must be a finite amount >= 0")
        if kind == "loss":  # the winner's price: above ours, and nothing to book
            return price
        bid_price = float(params["bp"])
        tolerance = price_tolerance(params["cur"])
        if price > bid_price + tolerance + ROUNDING:
            raise NoticeError(f"clearing price {price} is above our bid {bid_price}")
        return price


def price_tolerance(currency: str) -> float:
    """How far above our bid a clearing price in ``currency`` may be rendered: one minor unit
    (a cent; a whole unit for currencies without decimals)."""
    return 1.0 if currency.upper() in WHOLE_UNIT_CURRENCIES else PRICE_TOLERANCE
