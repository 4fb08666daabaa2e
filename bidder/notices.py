"""Signed win (``nurl``) and billing (``burl``) notice URLs, and reading them back.

A notice URL carries what the ledger needs (bid, imp, campaign, creative, user,
currency, test flag, our bid price) and a keyed BLAKE2b MAC over those values and the
notice kind, so a forged or edited notice is refused instead of booked. The
exchange substitutes ``${AUCTION_PRICE}`` with the clearing price.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re
from urllib.parse import quote

import msgspec

PRICE_MACRO = "${AUCTION_PRICE}"
# Exchanges may render the clearing price rounded (to cents, or whole yen): that is no reason to
# lose the notice. Above our bid by more than one minor unit of its currency (a cent CPM, a yen
# CPM), it is not our auction's price.
PRICE_TOLERANCE = 0.01
ROUNDING = 1e-9  # float rounding of the comparison itself
# ISO 4217 currencies without a minor unit: prices in them are rendered in whole units
WHOLE_UNIT_CURRENCIES = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split())
SIGNED_FIELDS = ("b", "i", "c", "r", "u", "cur", "t", "bp")
QUERY = "&".join(f"{name}={{}}" for name in SIGNED_FIELDS)
KINDS = ("win", "billing")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~:-]*")  # no escaping needed: the common case, kept cheap


def _escape(value: str) -> str:
    return value if _URL_SAFE.fullmatch(value) else quote(value, safe="")


class NoticeError(ValueError):
    """A notice that cannot be booked; the message says why."""


class NoticeSigner:
    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url.rstrip("/")
        key = hashlib.blake2b(secret.encode()).digest()[:64]  # any length -> <= 64 bytes
        # keyed BLAKE2b (a MAC by design, several times cheaper than HMAC-SHA256 here) over the
        # JSON array [kind, *values], unambiguous: no value can shift into another. The state
        # after '["kind",' is kept, so a signature hashes only the values.
        self._macs = {kind: hashlib.blake2b(b'["' + kind.encode() + b'",', key=key, digest_size=16)
                      for kind in KINDS}

    def _sign(self, kind: str, values: tuple[str, ...]) -> str:
        return self._signed_values(kind, msgspec.json.encode(values))

    def _signed_values(self, kind: str, encoded_values: bytes) -> str:
        """The MAC of ``kind`` and the values whose JSON array is ``encoded_values``."""
        mac = self._macs[kind].copy()
        mac.update(memoryview(encoded_values)[1:])  # '"b",...]' follows '["kind",'
        return mac.hexdigest()

    def urls(self, bid_id: str, imp_id: str, campaign: str, creative: str, user_key: str,
             currency: str, test: int, bid_price: float) -> tuple[str, str]:
        """(nurl, burl) for one bid."""
        values = (bid_id, imp_id, campaign, creative, user_key, currency, str(test),
                  repr(bid_price))
        # a value is URL-safe as it is in the common case: then so is their concatenation
        escaped = values if _URL_SAFE.fullmatch("".join(values)) else map(_escape, values)
        query = QUERY.format(*escaped)
        encoded = msgspec.json.encode(values)
        return (f"{self.base_url}/notice/win?{query}&s={self._signed_values('win', encoded)}"
                f"&p={PRICE_MACRO}",
                f"{self.base_url}/notice/billing?{query}"
                f"&s={self._signed_values('billing', encoded)}&p={PRICE_MACRO}")

    def verify(self, kind: str, params: dict[str, str]) -> tuple[dict[str, str], float]:
        """Check a notice's signature and price; return its fields and the clearing price."""
        missing = [k for k in SIGNED_FIELDS + ("s", "p") if k not in params]
        if missing:
            raise NoticeError(f"notice is missing parameter(s) {missing}: use the nurl/burl "
                              "exactly as the bid returned it")
        values = tuple(params[k] for k in SIGNED_FIELDS)
        signature = params["s"]  # ours is hex; compare_digest raises on a non-ASCII str
        if not (signature.isascii() and hmac.compare_digest(self._sign(kind, values), signature)):
            raise NoticeError("notice signature does not match: the URL was altered or is not ours")
        raw_price = params["p"]
        if raw_price == PRICE_MACRO:
            raise NoticeError("the ${AUCTION_PRICE} macro was not substituted with the clearing price")
        try:
            price = float(raw_price)
        except ValueError:
            raise NoticeError(f"clearing price {raw_price!r} is not a number") from None
        if not math.isfinite(price) or price < 0:
            raise NoticeError(f"clearing price {raw_price!r} must be a finite amount >= 0")
        bid_price = float(params["bp"])
        tolerance = 1.0 if params["cur"].upper() in WHOLE_UNIT_CURRENCIES else PRICE_TOLERANCE
        if price > bid_price + tolerance + ROUNDING:
            raise NoticeError(f"clearing price {price} is above our bid {bid_price}")
        return dict(zip(SIGNED_FIELDS, values)), price
