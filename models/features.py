"""The feature contract between the bid path, training data and model artifacts.

A scored row is a set of hashed indices, one (or several, for multi-valued
fields) per field. The row is split in two parts so that the bid path can score
every candidate of a request in one matrix operation:

* the *shared* part, the same for every candidate of one imp: request and user
  fields (``REQUEST_FIELDS`` and the multi-valued ``segment``);
* the *candidate* part, one fixed-width row per campaign x creative
  (``CANDIDATE_FIELDS``), precomputed once when the catalog is loaded; its
  ``format`` (banner, video, native) lets one auction score creatives of every
  format an imp offers together.

Indices are ``blake2b(field \\x1f value)`` truncated to the hash space, so the
same value hashes the same in training, in the artifact and in every worker.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from functools import lru_cache

import numpy as np

REQUEST_FIELDS: tuple[str, ...] = ("inventory", "devicetype", "os", "country", "hour")
SEGMENT_FIELD = "segment"
CANDIDATE_FIELDS: tuple[str, ...] = ("campaign", "creative", "size", "format")
FORMATS: tuple[str, ...] = ("banner", "video", "native")
# The value of a field a row leaves out: logs and callers from before formats are banner.
FIELD_DEFAULTS: dict[str, object] = {"format": "banner"}
ALL_FIELDS: tuple[str, ...] = REQUEST_FIELDS + (SEGMENT_FIELD,) + CANDIDATE_FIELDS

DEFAULT_HASH_BITS = 20


@lru_cache(maxsize=1 << 16, typed=True)
def feature_index(field: str, value: object, hash_bits: int = DEFAULT_HASH_BITS) -> int:
    """Hash one ``field=value`` pair into ``[0, 2**hash_bits)``.

    Cached (typed, so ``1`` and ``True`` stay apart): request values repeat (sites,
    countries, hours, segments), and a cache hit is several times cheaper than the hash.
    """
    digest = hashlib.blake2b(f"{field}\x1f{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << hash_bits) - 1)


def shared_indices(
    request: Mapping[str, object], segments: Iterable[int], hash_bits: int = DEFAULT_HASH_BITS
) -> np.ndarray:
    """Indices of the request fields and the user's segments, as an int64 vector."""
    idx = [feature_index(f, request[f], hash_bits) for f in REQUEST_FIELDS]
    idx += [feature_index(SEGMENT_FIELD, s, hash_bits) for s in segments]
    return np.array(idx, dtype=np.int64)


def candidate_indices(
    candidates: Iterable[Mapping[str, object]], hash_bits: int = DEFAULT_HASH_BITS
) -> np.ndarray:
    """One row of ``CANDIDATE_FIELDS`` indices per candidate, as an (n, 4) int64 matrix."""
    rows = [[feature_index(f, c[f] if f in c else FIELD_DEFAULTS[f], hash_bits)
             for f in CANDIDATE_FIELDS] for c in candidates]
    return np.asarray(rows, dtype=np.int64).reshape(-1, len(CANDIDATE_FIELDS))


def size_key(w: int, h: int) -> str:
    """The ``size`` feature value of a ``w`` x ``h`` creative (a native creative: its main
    image's size)."""
    return f"{w}x{h}"
