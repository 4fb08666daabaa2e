"""Impression logs: the TSV training format, and its encoding into hashed index rows.

The format (documented in docs/models.md) is one impression per line, tab
separated, with a header line naming the columns: every field of
``models.features.ALL_FIELDS`` (``segment`` holds the user's segments joined
by ``;``, empty for none; ``format`` may be left out, every row is then a
banner) and ``click`` (0 or 1). Other columns are ignored,
except ``p_true``, the click probability of the synthetic ground truth, which
``bidder train`` reports metrics of when it is present.

A batch of encoded rows is an ``(n, W)`` int64 matrix: the ``REQUEST_FIELDS``
indices, then the segment indices padded with ``PAD`` (-1) to the widest row,
then the ``CANDIDATE_FIELDS`` indices. ``PAD`` addresses a weight that is
always zero, so padded rows score like unpadded ones.
"""
from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.features import (ALL_FIELDS, CANDIDATE_FIELDS, FIELD_DEFAULTS, REQUEST_FIELDS,
                             SEGMENT_FIELD, feature_index)

PAD = -1
LABEL = "click"
TRUTH = "p_true"
SEGMENT_SEP = ";"


@dataclass
class Impressions:
    """Encoded impressions: hashed rows, click labels and (synthetic data only) true probabilities."""
    X: np.ndarray  # (n, W) int64, see module docstring
    y: np.ndarray  # (n,) float64, 0.0 or 1.0
    p_true: np.ndarray | None = None  # (n,) float64

    def __len__(self) -> int:
        return len(self.y)

    def take(self, rows: np.ndarray | slice) -> "Impressions":
        return Impressions(self.X[rows], self.y[rows],
                           None if self.p_true is None else self.p_true[rows])


def hash_column(field: str, values: np.ndarray, hash_bits: int) -> np.ndarray:
    """Hash a column of values, hashing each distinct value once."""
    uniq, inverse = np.unique(values, return_inverse=True)
    table = np.fromiter((feature_index(field, v, hash_bits) for v in uniq), np.int64, len(uniq))
    return table[inverse.reshape(-1)]


def segment_matrix(segment_lists: Sequence[Sequence[object]], hash_bits: int) -> np.ndarray:
    """Hashed segments, one row per impression, padded with ``PAD``."""
    width = max((len(s) for s in segment_lists), default=0)
    out = np.full((len(segment_lists), width), PAD, dtype=np.int64)
    cache: dict[object, int] = {}
    for r, segs in enumerate(segment_lists):
        for c, s in enumerate(segs):
            h = cache.get(s)
            if h is None:
                h = cache[s] = feature_index(SEGMENT_FIELD, s, hash_bits)
            out[r, c] = h
    return out


def assemble(request: np.ndarray, segments: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Join the request, segment and candidate blocks into the ``(n, W)`` row layout."""
    return np.ascontiguousarray(np.hstack([request, segments, candidate]), dtype=np.int64)


def rows_from_shared(shared: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The full rows ``shared ++ candidates[i]`` (what ``predict_proba_shared`` scores)."""
    n = len(candidates)
    return assemble(np.broadcast_to(shared[:len(REQUEST_FIELDS)], (n, len(REQUEST_FIELDS))),
                    np.broadcast_to(shared[len(REQUEST_FIELDS):], (n, len(shared) - len(REQUEST_FIELDS))),
                    candidates)


def read_tsv(path: str | Path, hash_bits: int) -> Impressions:
    """Read and encode an impression log; raises ``ValueError`` naming the file and line on bad input."""
    path = Path(path)
    columns: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header line with {', '.join(ALL_FIELDS)}, {LABEL}")
        missing = [c for c in (*ALL_FIELDS, LABEL) if c not in header and c not in FIELD_DEFAULTS]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}; "
                             f"expected {', '.join((*ALL_FIELDS, LABEL))} (see docs/models.md)")
        wanted = [c for c in (*ALL_FIELDS, LABEL, TRUTH) if c in header]
        pos = [header.index(c) for c in wanted]
        for c in wanted:
            columns[c] = []
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} columns, header has {len(header)}")
            for c, p in zip(wanted, pos):
                columns[c].append(row[p])
            if lineno % 500_000 == 0:
                print(f"read {lineno - 1:,} rows of {path}", file=sys.stderr)
    if not columns[LABEL]:
        raise ValueError(f"{path}: no impressions after the header")
    for c, default in FIELD_DEFAULTS.items():  # a log from before that column: every row default
        columns.setdefault(c, [str(default)] * len(columns[LABEL]))
    try:
        y = np.asarray(columns[LABEL], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: column {LABEL!r} must hold 0 or 1") from None
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{path}: column {LABEL!r} must hold 0 or 1")
    p_true = np.asarray(columns[TRUTH], dtype=np.float64) if TRUTH in columns else None
    return encode_columns(columns, y, hash_bits, p_true)


def encode_columns(columns: dict[str, Sequence[object]], y: np.ndarray, hash_bits: int,
                   p_true: np.ndarray | None = None) -> Impressions:
    """Encode string/int columns (``segment`` as ';'-joined text or as sequences) into rows."""
    req = np.column_stack([hash_column(f, np.asarray(columns[f], dtype=str), hash_bits)
                           for f in REQUEST_FIELDS])
    cand = np.column_stack([hash_column(f, np.asarray(columns[f], dtype=str), hash_bits)
                            for f in CANDIDATE_FIELDS])
    segs = [_split_segments(s) for s in columns[SEGMENT_FIELD]]
    return Impressions(assemble(req, segment_matrix(segs, hash_bits), cand), y, p_true)


def _split_segments(value: object) -> Sequence[object]:
    if isinstance(value, str):
        return [s for s in value.split(SEGMENT_SEP) if s]
    return value  # type: ignore[return-value]


def write_tsv(path: str | Path, columns: dict[str, Sequence[object]], clicks: Iterable[int],
              p_true: Iterable[float] | None = None) -> None:
    """Write an impression log (``segment`` entries are sequences of segment ids)."""
    path = Path(path)
    header = [*ALL_FIELDS, LABEL] + ([TRUTH] if p_true is not None else [])
    cols = [columns[f] for f in ALL_FIELDS]
    seg_pos = ALL_FIELDS.index(SEGMENT_FIELD)
    with path.open("w", newline="") as f:
        f.write("\t".join(header) + "\n")
        truth = iter(p_true) if p_true is not None else None
        for values, click in zip(zip(*cols), clicks):
            cells = [str(v) for v in values]
            cells[seg_pos] = SEGMENT_SEP.join(str(s) for s in values[seg_pos])
            cells.append(str(int(click)))
            if truth is not None:
                cells.append(f"{next(truth):.6g}")
            f.write("\t".join(cells) + "\n")
