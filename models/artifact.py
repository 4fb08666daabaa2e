"""Model artifacts: one file a trained model is saved to, loaded from, and hot-reloaded from.

The file is a zip of ``.npy`` members (``np.load`` reads it like any ``.npz``)
plus ``meta.json``: format version, model kind, hash bits, feature spec (the
field lists of ``models.features``), hyper-parameters, training metrics, the
version string and a SHA-256 over every array (name, dtype, shape, bytes).
Members are stored uncompressed with their data 64-byte aligned in the file,
so the arrays can be memory-mapped straight from it: workers that map the
same file share one copy of the weights in the page cache.

``load`` refuses a file that is not an artifact, was written by another
format version, was built for other feature fields, has arrays that do not
match its hash bits, or whose checksum does not match, with an
``ArtifactError`` naming the file and the problem.

What a server process holds (a private snapshot of the file, the current
model, hot reload) is ``bidder.model_handle.ModelHandle``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.base import HashedModel
from models.features import CANDIDATE_FIELDS, REQUEST_FIELDS, SEGMENT_FIELD

FORMAT_VERSION = 1
META = "meta.json"
_ALIGN = 64
_LOCAL_HEADER = 30
_PAD_EXTRA_ID = 0xD935  # zip "extra field" id of the alignment padding (as Android's zipalign)



class ArtifactError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


def feature_spec() -> dict[str, Any]:
    """The feature fields this code hashes; an artifact must have been trained on the same."""
    return {"request": list(REQUEST_FIELDS), "segment": SEGMENT_FIELD, "candidate": list(CANDIDATE_FIELDS)}


def _kinds() -> dict[str, type[HashedModel]]:
    from models.fm import FactorizationMachine
    from models.lr import FTRLLogisticRegression
    return {"lr": FTRLLogisticRegression, "fm": FactorizationMachine}


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def save(model: HashedModel, path: str | Path, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` atomically (a temporary file, then rename); returns the metadata."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(a) for name, a in model.arrays().items()}
    digest = checksum(arrays)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "hash_bits": model.hash_bits,
        "features": feature_spec(),
        "params": model.params(),
        "version": f"{model.version}-{digest[:12]}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": dict(metrics or {}),
        "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()},
        "sha256": digest,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, a in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a, allow_pickle=False)
                _write_aligned(zf, f, f"{name}.npy", buf.getvalue())
            zf.writestr(_zipinfo(META), json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def _write_aligned(zf: zipfile.ZipFile, f: Any, name: str, data: bytes) -> None:
    """Add a stored member whose data starts on a 64-byte boundary of the file."""
    info = _zipinfo(name)
    start = f.tell() + _LOCAL_HEADER + len(name.encode()) + 4
    pad = -start % _ALIGN
    info.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
    zf.writestr(info, data)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an artifact, without loading its arrays."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read(META))
    except FileNotFoundError:
        raise ArtifactError(f"model artifact {path} does not exist; train one with "
                            "`bidder train --synthetic 1000000 --out PATH` or pass --model PATH") from None
    except KeyError:
        raise ArtifactError(f"model artifact {path}: no {META}; not a file written by `bidder train`") from None
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"model artifact {path} is not a readable artifact ({exc}); "
                            "it may be truncated or not a model file: retrain it with `bidder train`") from None


def load(path: str | Path, mmap: bool = True) -> HashedModel:
    """Load and verify an artifact; ``mmap`` maps the arrays read-only from the file instead of copying.

    Map only files that are replaced by rename (as ``save`` does), never rewritten in place:
    ``bidder.model_handle`` maps a private snapshot for that reason.
    """
    path = Path(path)
    meta = read_meta(path)
    _check_meta(path, meta)
    arrays = _read_arrays(path, meta, mmap)
    if checksum(arrays) != meta["sha256"]:
        raise ArtifactError(f"model artifact {path} is corrupt: checksum mismatch "
                            f"(expected {meta['sha256'][:16]}...); retrain or copy it again")
    model = _kinds()[meta["kind"]].from_arrays(meta["hash_bits"], meta.get("params", {}), arrays)
    model.version = meta["version"]
    model.metrics = meta.get("metrics", {})  # type: ignore[attr-defined]
    return model


def _check_meta(path: Path, meta: Mapping[str, Any]) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"model artifact {path} has format version {version!r}; this bidder reads "
                            f"version {FORMAT_VERSION}: retrain it with this version's `bidder train`")
    kind = meta.get("kind")
    if kind not in _kinds():
        raise ArtifactError(f"model artifact {path} has unknown model kind {kind!r}; "
                            f"expected one of {', '.join(sorted(_kinds()))}")
    if meta.get("features") != feature_spec():
        raise ArtifactError(f"model artifact {path} was trained on feature fields {meta.get('features')}, "
                            f"but this bidder hashes {feature_spec()}: retrain it on the current fields")
    bits = meta.get("hash_bits")
    if not isinstance(bits, int) or not 4 <= bits <= 30:
        raise ArtifactError(f"model artifact {path} has invalid hash_bits {bits!r}")
    for name, spec in meta.get("arrays", {}).items():
        if name != "calibration" and spec["shape"][0] != (1 << bits) + 2:
            raise ArtifactError(f"model artifact {path}: array {name!r} has {spec['shape'][0]} rows, "
                                f"but hash_bits={bits} needs {(1 << bits) + 2}; the file is inconsistent")


def _read_arrays(path: Path, meta: Mapping[str, Any], mmap: bool) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for name in meta["arrays"]:
                info = zf.getinfo(f"{name}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ArtifactError(f"model artifact {path}: member {name}.npy is compressed; "
                                        "artifacts must be written by `bidder train` (stored members)")
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                f.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
                major, minor = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if fortran or dtype.hasobject:
                    raise ArtifactError(f"model artifact {path}: member {name}.npy has an unsupported layout")
                offset = f.tell()
                count = int(np.prod(shape))
                if offset + count * dtype.itemsize > os.fstat(f.fileno()).st_size:
                    raise ArtifactError(f"model artifact {path} is truncated (member {name}.npy)")
                if mmap:
                    arrays[name] = np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset,
                                                        shape=shape))
                else:
                    arrays[name] = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
    except KeyError as exc:
        raise ArtifactError(f"model artifact {path} lacks member {exc}; the file is incomplete") from None
    except (zipfile.BadZipFile, ValueError, OSError, struct.error) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"model artifact {path} is corrupt ({exc}); retrain or copy it again") from None
    return arrays
