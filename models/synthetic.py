"""Synthetic impression logs with a known ground-truth click model.

Impressions are drawn from the shared world (``models.world``: inventory,
device types, OSes, countries, hours, users and their segments) and the
bundled campaign catalog (``bidder/data/campaigns.json``: a campaign is shown
only where its targeting allows, with one of its creatives). The click
probability is a logistic model with main effects for every field plus three
pairwise interactions that a linear model cannot express:

* user segment x campaign category (interest matches the ad),
* country x campaign,
* device type x creative size.

Each creative format (banner, video, native) has a main effect of its own.

Each interaction is low rank (built from small latent vectors), as in real
logs and as a factorization machine can learn. ``interaction`` scales them
(0 gives a purely additive truth). The intercept is solved so the mean CTR is
``base_ctr``.

``python -m models.synthetic --rows N --out FILE`` writes the TSV of
``models.logs`` (with the ``p_true`` column).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import world
from models.features import (CANDIDATE_FIELDS, FORMATS, REQUEST_FIELDS, SEGMENT_FIELD,
                             feature_index, size_key)
from models.logs import PAD, Impressions, assemble, write_tsv

# the bundled catalog of the sibling bidder package (a data file, not an import)
CATALOG = Path(__file__).resolve().parent.parent / "bidder" / "data" / "campaigns.json"
DEFAULT_USERS = 20_000
DEFAULT_BASE_CTR = 0.01
DEFAULT_INTERACTION = 0.15


@dataclass(frozen=True)
class Campaign:
    id: str
    category: str
    creatives: tuple[tuple[str, str, str], ...]  # (creative id, size key, format)
    countries: frozenset[str] | None
    devicetypes: frozenset[int] | None


def load_catalog(path: Path | None = None) -> list[Campaign]:
    """Campaigns of the catalog (default: the bundled one), or a fixed stand-in if it is absent."""
    path = CATALOG if path is None else path
    if not path.exists():
        sizes = [size_key(w, h) for w, h in world.SIZES]
        return [Campaign(f"c{i:02d}", world.IAB_CATEGORIES[i % 10],
                         tuple((f"c{i:02d}-cr{j}", sizes[(i + j) % len(sizes)], "banner")
                               for j in (1, 2)),
                         None, None) for i in range(1, 25)]
    out = []
    for c in json.loads(path.read_text())["campaigns"]:
        targeting = c.get("targeting") or {}
        countries = targeting.get("countries")
        devicetypes = targeting.get("devicetypes")
        out.append(Campaign(
            id=str(c["id"]),
            category=(c.get("cat") or ["IAB24"])[0].split("-")[0],
            creatives=tuple((str(cr["id"]), creative_size(cr), cr.get("format", "banner"))
                            for cr in c["creatives"]),
            countries=frozenset(countries) if countries else None,
            devicetypes=frozenset(devicetypes) if devicetypes else None,
        ))
    return out


def creative_size(creative: dict) -> str:
    """The ``size`` value of a catalog creative: its w x h, a native one's main image's."""
    if creative.get("format") == "native":
        return size_key(creative["image"]["w"], creative["image"]["h"])
    return size_key(creative["w"], creative["h"])


def _popularity(rng: np.random.Generator, n: int, skew: float = 1.0) -> np.ndarray:
    """Zipf-like draw probabilities over ``n`` values in a random order."""
    p = 1.0 / np.arange(1, n + 1) ** skew
    return rng.permutation(p / p.sum())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class GroundTruth:
    """The true click model: main effects, low-rank interactions, an intercept fixing the mean CTR."""

    def __init__(self, campaigns: list[Campaign], n_users: int, interaction: float, seed: int):
        rng = np.random.default_rng(seed)
        self.campaigns = campaigns
        self.inventory = [world.inventory_key(s, None) for s in world.SITES] + \
                         [world.inventory_key(None, a) for a in world.APPS]
        self.creatives = [cr for c in campaigns for cr, _, _ in c.creatives]
        self.sizes = [size_key(w, h) for w, h in world.SIZES]
        self.sizes += sorted({s for c in campaigns for _, s, _ in c.creatives} - set(self.sizes))
        self.formats = list(FORMATS)
        cats = sorted({c.category for c in campaigns})
        self.campaign_cat = np.array([cats.index(c.category) for c in campaigns])
        self.creative_campaign = np.array([i for i, c in enumerate(campaigns) for _ in c.creatives])
        self.creative_size = np.array([self.sizes.index(s) for c in campaigns
                                       for _, s, _ in c.creatives])
        self.creative_format = np.array([self.formats.index(f) for c in campaigns
                                         for _, _, f in c.creatives], dtype=np.int64)
        n_c = len(campaigns)
        # Draw probabilities of the context.
        self.p_inventory = _popularity(rng, len(self.inventory))
        self.p_devicetype = _popularity(rng, len(world.DEVICETYPES), 0.8)
        self.p_os = _popularity(rng, len(world.OSES), 0.8)
        self.p_country = _popularity(rng, len(world.COUNTRIES), 0.9)
        hours = np.arange(24)
        self.p_hour = 1.0 + 0.6 * np.sin((hours - 9) / 24 * 2 * np.pi)
        self.p_hour /= self.p_hour.sum()
        # Main effects (logit scale).
        self.w_inventory = rng.normal(0, 0.45, len(self.inventory))
        self.w_devicetype = rng.normal(0, 0.3, len(world.DEVICETYPES))
        self.w_os = rng.normal(0, 0.15, len(world.OSES))
        self.w_country = rng.normal(0, 0.3, len(world.COUNTRIES))
        self.w_hour = 0.25 * np.sin((hours - 20) / 24 * 2 * np.pi)
        self.w_segment = rng.normal(0, 0.2, world.N_SEGMENTS)
        self.w_campaign = rng.normal(0, 0.35, n_c)
        self.w_creative = rng.normal(0, 0.2, len(self.creatives))
        self.w_size = rng.normal(0, 0.25, len(self.sizes))
        self.w_format = np.array([0.0, -0.4, 0.3])  # banner, video, native: fixed, not drawn
        # Low-rank interactions.
        s = interaction
        self.x_segment_cat = s * rng.normal(0, 0.5, (world.N_SEGMENTS, 3)) @ rng.normal(0, 0.5, (3, len(cats)))
        self.x_country_campaign = s * rng.normal(0, 0.6, (len(world.COUNTRIES), 3)) @ rng.normal(0, 0.6, (3, n_c))
        self.x_device_size = s * rng.normal(0, 0.6, (len(world.DEVICETYPES), 2)) @ rng.normal(0, 0.6, (2, len(self.sizes)))
        # Users and their segments (as seeded into memcached).
        self.n_users = n_users
        segs = [world.user_segments(u) for u in range(n_users)]
        self.user_segments = segs
        self.user_onehot = np.zeros((n_users, world.N_SEGMENTS))
        for u, ss in enumerate(segs):
            self.user_onehot[u, list(ss)] = 1.0
        # Targeting: which campaigns may be shown for each (country, devicetype).
        self.eligible = np.ones((len(world.COUNTRIES), len(world.DEVICETYPES), n_c), dtype=bool)
        for k, c in enumerate(campaigns):
            if c.countries is not None:
                self.eligible[[i for i, x in enumerate(world.COUNTRIES) if x not in c.countries], :, k] = False
            if c.devicetypes is not None:
                self.eligible[:, [i for i, x in enumerate(world.DEVICETYPES) if x not in c.devicetypes], k] = False
        self.intercept = 0.0

    def logit(self, d: dict[str, np.ndarray]) -> np.ndarray:
        """Click logit of coded impressions (``d`` as returned by ``draw``)."""
        user_seg = self.user_onehot @ (self.w_segment[:, None] + self.x_segment_cat[:, self.campaign_cat])
        return (self.intercept
                + self.w_inventory[d["inventory"]] + self.w_devicetype[d["devicetype"]]
                + self.w_os[d["os"]] + self.w_country[d["country"]] + self.w_hour[d["hour"]]
                + user_seg[d["user"], d["campaign"]]
                + self.w_campaign[d["campaign"]] + self.w_creative[d["creative"]]
                + self.w_size[d["size"]] + self.w_format[d["format"]]
                + self.x_country_campaign[d["country"], d["campaign"]]
                + self.x_device_size[d["devicetype"], d["size"]])

    def draw(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` coded impressions (indices into the vocabularies above)."""
        d = {
            "inventory": rng.choice(len(self.inventory), n, p=self.p_inventory),
            "devicetype": rng.choice(len(world.DEVICETYPES), n, p=self.p_devicetype),
            "os": rng.choice(len(world.OSES), n, p=self.p_os),
            "country": rng.choice(len(world.COUNTRIES), n, p=self.p_country),
            "hour": rng.choice(24, n, p=self.p_hour),
            "user": rng.integers(0, self.n_users, n),
        }
        mask = self.eligible[d["country"], d["devicetype"]]  # (n, campaigns)
        keys = np.where(mask, rng.random(mask.shape), -1.0)
        d["campaign"] = keys.argmax(1)
        # Impressions no campaign may take are re-targeted to any campaign (rare with the sample).
        first = np.concatenate([[0], np.cumsum([len(c.creatives) for c in self.campaigns])])
        counts = np.diff(first)
        d["creative"] = first[d["campaign"]] + (rng.random(n) * counts[d["campaign"]]).astype(np.int64)
        d["size"] = self.creative_size[d["creative"]]
        d["format"] = self.creative_format[d["creative"]]
        return d

    def calibrate_intercept(self, base_ctr: float, rng: np.random.Generator) -> None:
        """Set the intercept so the mean click probability is ``base_ctr`` (bisection on a sample)."""
        d = self.draw(200_000, rng)
        base = self.logit(d) - self.intercept
        lo, hi = -15.0, 5.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(base + mid).mean() < base_ctr else (lo, mid)
        self.intercept = (lo + hi) / 2


@dataclass
class SyntheticLog:
    truth: GroundTruth
    codes: dict[str, np.ndarray]
    p_true: np.ndarray
    clicks: np.ndarray

    def encode(self, hash_bits: int) -> Impressions:
        """Hashed rows in the ``models.logs`` layout (each vocabulary value hashed once)."""
        t = self.truth

        def hashed(field: str, vocab: list[object], codes: np.ndarray) -> np.ndarray:
            table = np.array([feature_index(field, v, hash_bits) for v in vocab], dtype=np.int64)
            return table[codes]

        vocab = self._vocab()
        req = np.column_stack([hashed(f, vocab[f], self.codes[f]) for f in REQUEST_FIELDS])
        cand = np.column_stack([hashed(f, vocab[f], self.codes[f]) for f in CANDIDATE_FIELDS])
        width = max(len(s) for s in t.user_segments)
        seg_table = np.full((t.n_users, width), PAD, dtype=np.int64)
        for u, ss in enumerate(t.user_segments):
            seg_table[u, :len(ss)] = [feature_index(SEGMENT_FIELD, s, hash_bits) for s in ss]
        return Impressions(assemble(req, seg_table[self.codes["user"]], cand),
                           self.clicks.astype(np.float64), self.p_true)

    def columns(self) -> dict[str, list[object]]:
        """Field values per column, as ``models.logs.write_tsv`` takes them."""
        vocab = self._vocab()
        cols: dict[str, list[object]] = {f: [vocab[f][i] for i in self.codes[f]]
                                         for f in (*REQUEST_FIELDS, *CANDIDATE_FIELDS)}
        cols[SEGMENT_FIELD] = [self.truth.user_segments[u] for u in self.codes["user"]]
        return cols

    def _vocab(self) -> dict[str, list[object]]:
        t = self.truth
        return {"inventory": t.inventory, "devicetype": list(world.DEVICETYPES), "os": list(world.OSES),
                "country": list(world.COUNTRIES), "hour": list(range(24)),
                "campaign": [c.id for c in t.campaigns], "creative": t.creatives, "size": t.sizes,
                "format": t.formats}


def generate(n: int, seed: int = 0, interaction: float = DEFAULT_INTERACTION, base_ctr: float = DEFAULT_BASE_CTR,
             n_users: int = DEFAULT_USERS, catalog: Path | None = None) -> SyntheticLog:
    """``n`` impressions with clicks drawn from the ground truth (same ``seed`` -> same log)."""
    rng = np.random.default_rng(seed)
    truth = GroundTruth(load_catalog(catalog), n_users, interaction, seed)
    truth.calibrate_intercept(base_ctr, rng)
    codes = truth.draw(n, rng)
    p = _sigmoid(truth.logit(codes))
    clicks = (rng.random(n) < p).astype(np.int8)
    return SyntheticLog(truth, codes, p, clicks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="impressions to write")
    parser.add_argument("--out", required=True, help="TSV file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interaction", type=float, default=DEFAULT_INTERACTION, help="scale of the interaction terms")
    parser.add_argument("--base-ctr", type=float, default=DEFAULT_BASE_CTR)
    args = parser.parse_args(argv)
    log = generate(args.rows, args.seed, args.interaction, args.base_ctr)
    write_tsv(args.out, log.columns(), log.clicks, log.p_true)
    print(f"wrote {args.rows:,} impressions ({int(log.clicks.sum()):,} clicks) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
