"""The synthetic world shared by seeding, training data and load traffic.

One place names the sites, apps, countries, device types, banner sizes, user
segments and user ids that exist in the demo, so that the users seeded into
memcached, the impressions a model is trained on and the bid requests a load
test sends all speak about the same things.
"""
from __future__ import annotations

import random

SITES: tuple[str, ...] = tuple(
    f"{name}.example"
    for name in (
        "news", "sports", "weather", "recipes", "travel", "finance", "autos", "games",
        "movies", "music", "tech", "health", "fashion", "home", "pets", "science",
        "politics", "local", "jobs", "realestate", "parenting", "fitness", "books", "comics",
    )
)
APPS: tuple[str, ...] = tuple(
    f"com.example.{name}"
    for name in (
        "puzzle", "runner", "chess", "solitaire", "radio", "podcasts", "maps", "chat",
        "photos", "shop", "bank", "video", "scores", "cards", "notes", "weather",
    )
)
BLOCKED_DOMAIN = "bad.example"

COUNTRIES: tuple[str, ...] = ("USA", "JPN", "GBR", "DEU", "FRA", "CAN", "BRA", "IND", "AUS", "KOR")
# OpenRTB 2.6 list: Device Type (AdCOM 1.0): 1 mobile/tablet, 2 PC, 3 CTV, 4 phone, 5 tablet, 6 connected, 7 STB.
DEVICETYPES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
OSES: tuple[str, ...] = ("iOS", "Android", "Windows", "macOS", "Linux", "other")
SIZES: tuple[tuple[int, int], ...] = ((300, 250), (728, 90), (320, 50), (160, 600), (300, 600), (970, 250))
IAB_CATEGORIES: tuple[str, ...] = tuple(f"IAB{i}" for i in range(1, 27))

N_SEGMENTS = 64
USER_ID_PREFIX = "user-"


def user_id(n: int) -> str:
    """The id of the n-th synthetic user, as seeded into memcached and sent in ``user.id``."""
    return f"{USER_ID_PREFIX}{n:08d}"


def inventory_key(site_domain: str | None, app_bundle: str | None) -> str:
    """The inventory feature value: ``site:<domain>`` or ``app:<bundle>`` (``unknown`` if neither)."""
    if site_domain:
        return f"site:{site_domain}"
    if app_bundle:
        return f"app:{app_bundle}"
    return "unknown"


def user_segments(n: int) -> tuple[int, ...]:
    """The segments of the n-th synthetic user: 0-6 of ``N_SEGMENTS``, the same every time."""
    rng = random.Random(n)
    return tuple(sorted(rng.sample(range(N_SEGMENTS), rng.randint(0, 6))))
