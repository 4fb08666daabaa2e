"""Realistic OpenRTB 2.6 bid requests, generated ahead of time and deterministic given a seed.

The load generators (the Locust file, the open-loop client, ``bidder demo``)
send pre-built bodies so that building JSON never becomes the bottleneck of a
load test. The traffic speaks about the same sites, apps, countries and users
as the seeded feature store and the trained model (``models.world``): a share
of requests name users that exist in memcached, some name users that do not,
some name nobody. Every proportion is a field of ``Mix`` and can be given on a
command line as ``app=0.4,gzip=0.1,...`` (``Mix.parse``).
"""
from __future__ import annotations

import dataclasses
import gzip
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from models import world

CONTENT_TYPE = "application/json"
OPENRTB_VERSION = "2.6"
# Floors are drawn in USD and converted, so a floor means about the same whatever its currency.
USD_PER_UNIT = {"USD": 1.0, "EUR": 1.08, "JPY": 0.0067}
_UAS = {
    "iOS": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
           "Mobile/15E148",
    "Android": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 "
               "Mobile Safari/537.36",
    "Windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 "
               "Safari/537.36",
    "macOS": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 "
             "Safari/605.1.15",
    "Linux": "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "other": "Mozilla/5.0 (compatible; ExampleTV/1.0)",
}


@dataclass(frozen=True)
class Mix:
    """Proportions of the generated traffic (each a probability per request unless noted)."""

    app: float = 0.4                 # app inventory, else site
    multi_imp: float = 0.2           # 2..max_imps imps, else one
    max_imps: int = 3
    multi_format: float = 0.3        # banner.format lists several sizes
    video: float = 0.1               # an imp is video only (VAST)
    native: float = 0.1              # an imp is native only (Native 1.2)
    banner_video: float = 0.05       # an imp offers banner and video; the rest are banner only
    known_user: float = 0.7          # user.id of a seeded user
    unknown_user: float = 0.2        # user.id nobody seeded; the rest send no user id
    users: int = 10_000              # seeded users: world.user_id(0 .. users-1)
    floor: float = 0.85              # imp has a bidfloor
    floor_min: float = 0.05          # USD CPM, uniform between min and max
    floor_max: float = 2.0
    eur: float = 0.1                 # floor currency EUR
    jpy: float = 0.05                # floor currency JPY; the rest USD
    deal: float = 0.1                # imp carries a pmp with deals (deal floor above imp floor)
    blocks: float = 0.3              # request carries bcat/badv
    blocked_domain: float = 0.02     # site.domain is world.BLOCKED_DOMAIN
    gzip: float = 0.1                # body sent gzip-compressed (Content-Encoding: gzip)
    accept_gzip: float = 0.2         # request says Accept-Encoding: gzip
    second_price: float = 0.05       # at=2, else at=1
    no_tmax: float = 0.2             # tmax absent (server default applies), else one of tmax_ms
    tmax_ms: tuple[int, ...] = (50, 80, 100, 120)

    @classmethod
    def parse(cls, text: str) -> "Mix":
        """``"app=0.5,gzip=0,users=1000"`` -> Mix with those fields changed (others default)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, raw = part.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"traffic mix: {part!r} is not NAME=VALUE with NAME one of "
                                 f"{', '.join(fields)}")
            if name == "tmax_ms":
                changes[name] = tuple(int(v) for v in raw.split("/"))
            else:
                kind = int if fields[name].type in ("int", int) else float
                changes[name] = kind(raw)
        mix = dataclasses.replace(cls(), **changes)
        mix.validate()
        return mix

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not 0.0 <= value <= 1.0 and f.name not in (
                    "floor_min", "floor_max"):
                raise ValueError(f"traffic mix: {f.name}={value} is not a share in [0, 1]")
        if self.known_user + self.unknown_user > 1.0:
            raise ValueError("traffic mix: known_user + unknown_user must not exceed 1")
        if self.video + self.native + self.banner_video > 1.0:
            raise ValueError("traffic mix: video + native + banner_video must not exceed 1")
        if self.eur + self.jpy > 1.0:
            raise ValueError("traffic mix: eur + jpy must not exceed 1")
        if self.max_imps < 1 or self.users < 1 or not self.tmax_ms:
            raise ValueError("traffic mix: max_imps and users must be >= 1, tmax_ms non-empty")
        if not 0 <= self.floor_min <= self.floor_max:
            raise ValueError("traffic mix: need 0 <= floor_min <= floor_max")


class BidRequest(NamedTuple):
    """One ready-to-send request: the body bytes as sent and the HTTP headers."""

    body: bytes
    headers: dict[str, str]


def _floor(rng: random.Random, mix: Mix, cur: str) -> float:
    """A floor in ``cur``: uniform in USD over the mix's range, converted."""
    usd = rng.uniform(mix.floor_min, mix.floor_max)
    value = usd / USD_PER_UNIT[cur]
    return round(value) if cur == "JPY" else round(value, 2)


# Players and native layouts as exchanges describe them (the bundled catalog has creatives for them)
VIDEO_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720), (320, 480))
VIDEO_MIMES = (["video/mp4"], ["video/mp4", "video/webm"], ["video/webm", "application/javascript"])
VIDEO_PROTOCOLS = ([2, 3, 5, 6], [2, 3, 5, 6, 7, 8], [7, 8, 11, 12])


def _video(rng: random.Random) -> dict[str, Any]:
    w, h = rng.choice(VIDEO_SIZES)
    return {"mimes": rng.choice(VIDEO_MIMES), "minduration": 5,
            "maxduration": rng.choice((15, 30, 60)), "protocols": rng.choice(VIDEO_PROTOCOLS),
            "w": w, "h": h, "linearity": 1, "plcmt": rng.choice((1, 2)), "startdelay": 0}


def _native(rng: random.Random) -> dict[str, Any]:
    """imp.native: a Native 1.2 request (title, main image, icon, sponsored, description, CTA),
    mostly as a JSON string, sometimes as the object itself as some exchanges send it."""
    main = ({"type": 3, "wmin": 600, "hmin": 314} if rng.random() < 0.7
            else {"type": 3, "w": 1200, "h": 627})
    assets = [{"id": 1, "required": 1, "title": {"len": rng.choice((25, 90, 140))}},
              {"id": 2, "required": 1, "img": main},
              {"id": 3, "required": int(rng.random() < 0.5), "img": {"type": 1, "wmin": 50,
                                                                    "hmin": 50}},
              {"id": 4, "required": 1, "data": {"type": 1, "len": 25}},
              {"id": 5, "required": int(rng.random() < 0.3), "data": {"type": 2, "len": 140}},
              {"id": 6, "required": 0, "data": {"type": 12, "len": 15}}]
    request = {"ver": "1.2", "context": rng.choice((1, 2)), "plcmttype": rng.choice((1, 4)),
               "plcmtcnt": 1, "assets": assets}
    if rng.random() < 0.2:
        return {"ver": "1.2", "request": request}
    return {"ver": "1.2", "request": msgspec.json.encode(request).decode()}


def _imp(rng: random.Random, mix: Mix, index: int, secure: int, cur: str) -> dict[str, Any]:
    kind = "banner"
    if mix.video or mix.native or mix.banner_video:  # no draw at all: banner-only traffic as before
        draw = rng.random()
        kind = ("video" if draw < mix.video else "native" if draw < mix.video + mix.native
                else "banner_video" if draw < mix.video + mix.native + mix.banner_video
                else "banner")
    if kind in ("video", "native"):
        imp: dict[str, Any] = {"id": str(index + 1), "secure": secure,
                               "tagid": f"slot-{kind}-{index}"}
        imp[kind] = _video(rng) if kind == "video" else _native(rng)
        return _priced(rng, mix, imp, cur)
    w, h = rng.choice(world.SIZES)
    banner: dict[str, Any] = {"w": w, "h": h, "pos": rng.choice((0, 1, 3))}
    if rng.random() < mix.multi_format:
        sizes = [(w, h)] + rng.sample([s for s in world.SIZES if s != (w, h)], rng.randint(1, 2))
        banner["format"] = [{"w": sw, "h": sh} for sw, sh in sizes]
    else:
        banner["format"] = [{"w": w, "h": h}]
    imp = {"id": str(index + 1), "banner": banner, "secure": secure,
           "tagid": f"slot-{w}x{h}-{index}"}
    if kind == "banner_video":
        imp["video"] = _video(rng)
    return _priced(rng, mix, imp, cur)


def _priced(rng: random.Random, mix: Mix, imp: dict[str, Any], cur: str) -> dict[str, Any]:
    """``imp`` with its floor and deals drawn."""
    if rng.random() < mix.floor:
        imp["bidfloor"], imp["bidfloorcur"] = _floor(rng, mix, cur), cur
    if rng.random() < mix.deal:  # deal floors sit above the open-auction floor, as sold
        base = imp.get("bidfloor")
        deals = []
        for d in range(rng.randint(1, 2)):
            floor = base * rng.uniform(1.1, 2.0) if base else _floor(rng, mix, cur)
            deals.append({"id": f"deal-{rng.randrange(100):03d}-{d}", "at": 1,
                          "bidfloor": round(floor) if cur == "JPY" else round(floor, 2),
                          "bidfloorcur": cur})
        imp["pmp"] = {"private_auction": int(rng.random() < 0.3), "deals": deals}
    return imp


def make_request(rng: random.Random, mix: Mix, serial: int) -> dict[str, Any]:
    """One OpenRTB 2.6 BidRequest as a dict (the decoded form of a generated body)."""
    n_imps = rng.randint(2, max(2, mix.max_imps)) if (
        mix.max_imps > 1 and rng.random() < mix.multi_imp) else 1
    secure = int(rng.random() < 0.9)
    draw = rng.random()  # one floor currency per request, as exchanges do
    cur = "EUR" if draw < mix.eur else "JPY" if draw < mix.eur + mix.jpy else "USD"
    req: dict[str, Any] = {"id": f"req-{serial:010d}-{rng.getrandbits(32):08x}",
                           "imp": [_imp(rng, mix, i, secure, cur) for i in range(n_imps)]}
    os_name = rng.choice(world.OSES)
    country = rng.choice(world.COUNTRIES)
    publisher = {"id": f"pub-{rng.randrange(50):03d}"}
    if rng.random() < mix.app:
        bundle = rng.choice(world.APPS)
        req["app"] = {"id": f"app-{world.APPS.index(bundle)}", "bundle": bundle,
                      "name": bundle.rsplit(".", 1)[1], "publisher": publisher,
                      "cat": [rng.choice(world.IAB_CATEGORIES)]}
        devicetype = rng.choice((1, 4, 5))
    else:
        domain = (world.BLOCKED_DOMAIN if rng.random() < mix.blocked_domain
                  else rng.choice(world.SITES))
        req["site"] = {"id": f"site-{domain.split('.')[0]}", "domain": domain,
                       "page": f"https://{domain}/article/{rng.randrange(10_000)}",
                       "publisher": publisher, "cat": [rng.choice(world.IAB_CATEGORIES)]}
        devicetype = rng.choice(world.DEVICETYPES)
    device: dict[str, Any] = {
        "ua": _UAS[os_name], "ip": f"203.0.113.{rng.randrange(1, 255)}",
        "devicetype": devicetype, "os": os_name, "geo": {"country": country},
        "language": "ja" if country == "JPN" else "en",
    }
    if "app" in req:
        device["ifa"] = f"{rng.getrandbits(128):032x}"
    req["device"] = device
    draw = rng.random()
    if draw < mix.known_user:
        req["user"] = {"id": world.user_id(rng.randrange(mix.users))}
    elif draw < mix.known_user + mix.unknown_user:
        req["user"] = {"id": f"anon-{rng.getrandbits(48):012x}"}
    req["at"] = 2 if rng.random() < mix.second_price else 1
    if rng.random() >= mix.no_tmax:
        req["tmax"] = rng.choice(mix.tmax_ms)
    req["cur"] = ["USD"]
    if rng.random() < mix.blocks:
        req["bcat"] = rng.sample(world.IAB_CATEGORIES, rng.randint(1, 3))
        req["badv"] = [world.BLOCKED_DOMAIN]
    req["source"] = {"tid": f"{rng.getrandbits(64):016x}"}
    req["regs"] = {"coppa": 0}
    return req


def generate(n: int, mix: Mix | None = None, seed: int = 0) -> list[BidRequest]:
    """``n`` ready-to-send requests; the same ``seed`` and ``mix`` give the same bytes."""
    mix = mix or Mix()
    mix.validate()
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    out: list[BidRequest] = []
    for serial in range(n):
        body = encode(make_request(rng, mix, serial))
        headers = {"Content-Type": CONTENT_TYPE, "x-openrtb-version": OPENRTB_VERSION}
        if rng.random() < mix.gzip:
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if rng.random() < mix.accept_gzip:
            headers["Accept-Encoding"] = "gzip"
        out.append(BidRequest(body, headers))
    return out


def demo_requests(n: int, users: int = 10_000, seed: int = 0) -> list[tuple[bytes, dict[str, str]]]:
    """``n`` (body, headers) pairs of the default mix for ``bidder demo``; ``users`` seeded."""
    return [(r.body, r.headers) for r in generate(n, Mix(users=users), seed)]


def decode(request: BidRequest) -> dict[str, Any]:
    """The JSON object a request carries, gunzipped when it was sent compressed."""
    body = request.body
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return msgspec.json.decode(body)
