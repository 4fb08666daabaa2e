"""The serving model of a process: a private snapshot of the artifact, hot reload, last good.

``ModelHandle`` is what the server holds: the current model, a cheap
``maybe_reload`` that watches the file, ``reload`` for SIGHUP and
``adopt_last_good`` for the master before a fork. The artifact format itself
(save, load, verify) is ``models.artifact``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from bidder import metrics
from models.artifact import ArtifactError, load
from models.base import HashedModel

BUNDLED = Path(__file__).resolve().parent / "data" / "model.npz"
SNAPSHOT_DIR = Path(os.environ.get("BIDDER_MODEL_SNAPSHOTS",
                                   Path(os.environ.get("TMPDIR", "/tmp")) / f"bidder-models-{os.getuid()}"))
LAST_GOOD_PREFIX = "last-good-"  # + a digest of the model path: names its last valid snapshot

log = logging.getLogger("bidder.models")


def snapshot(path: str | Path, directory: Path | None = None) -> Path:
    """A private, never-rewritten copy of ``path``, named by its content hash (made once per content).

    Mapping the user's file directly would break if someone rewrote it in place (``cp`` over it:
    the mapped pages change under the workers, or vanish and raise SIGBUS). Snapshots are only
    ever created by rename, so every worker that loads the same version maps the same file and
    shares its pages.
    """
    path = Path(path)
    directory = directory or SNAPSHOT_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        target = directory / f"{_file_digest(path)}.npz"
        if target.exists():  # another worker (or an earlier load) made it: share it
            os.utime(target)
        else:
            tmp = directory / f".{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                h = hashlib.sha256()
                with open(path, "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                target = directory / f"{h.hexdigest()[:32]}.npz"  # named by what was copied
                try:
                    os.link(tmp, target)  # never replaces: a racing worker's copy is kept and shared
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
    except FileNotFoundError:
        raise ArtifactError(f"model artifact {path} does not exist; train one with "
                            "`bidder train --synthetic 1000000 --out PATH` or pass --model PATH") from None
    _prune(directory, keep=target)
    return target


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:32]


def _prune(directory: Path, keep: Path, max_age_s: float = 3600.0) -> None:
    """Remove snapshots unused for an hour (mapped ones stay valid: unlink keeps the pages),
    but never one a last-good pointer names."""
    now = time.time()
    named = set()
    for pointer in directory.glob(LAST_GOOD_PREFIX + "*"):
        try:
            named.add(pointer.read_text().strip())
        except OSError:
            pass
    for p in directory.glob("*.npz"):
        try:
            if p != keep and p.name not in named and now - p.stat().st_mtime > max_age_s:
                p.unlink()
        except OSError:
            pass


class ModelHandle:
    """The serving model of one process, swapped atomically when its file changes.

    Created in the master before fork (``preload_app``), so workers start with the master's
    mapped arrays. ``current`` is a plain attribute: a request takes the model once and keeps
    that object even if a reload swaps ``current`` meanwhile.
    """

    def __init__(self, path: str | Path | None, watch_s: float = 2.0, mmap: bool = True):
        self.path = Path(path) if path is not None else BUNDLED
        self.watch_s = watch_s
        self.mmap = mmap
        self.loaded_at = 0.0
        self.reloads = 0
        self.refused = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._signature = self._stat()
        self._snapshot: Path | None = None  # the private copy ``current`` is mapped from
        self._pointer = SNAPSHOT_DIR / (LAST_GOOD_PREFIX + hashlib.sha256(
            str(self.path.resolve()).encode()).hexdigest()[:16])
        self.current: HashedModel = self._load()  # raises ArtifactError: no model, no server
        self.loaded_at = time.time()
        self._next_check = time.monotonic() + watch_s

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> HashedModel:
        if not self.mmap:
            return load(self.path, mmap=False)
        copy = snapshot(self.path)
        try:
            model = load(copy)
        except ArtifactError as exc:
            copy.unlink(missing_ok=True)
            raise ArtifactError(str(exc).replace(str(copy), str(self.path))) from None
        self._snapshot = copy
        self._point_last_good(copy)
        return model

    def _point_last_good(self, copy: Path) -> None:
        """Name ``copy`` as the last valid version of this path (for the master: see
        ``adopt_last_good``); a pointer that cannot be written only costs that adoption."""
        tmp = self._pointer.with_name(f".{self._pointer.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(copy.name)
            os.replace(tmp, self._pointer)
        except OSError as exc:
            log.warning("cannot record the last good model in %s: %s", self._pointer, exc)

    def adopt_last_good(self) -> bool:
        """In the master before a fork: take up the last version any worker loaded, so a new
        worker (respawned, or after SIGHUP) serves the model its siblings serve, even when the
        file at ``path`` has since been replaced by one that is refused. True if swapped."""
        if not self.mmap:
            return False
        try:
            name = self._pointer.read_text().strip()
        except OSError:
            return False
        copy = self._pointer.with_name(name)
        if self._snapshot is not None and copy == self._snapshot:
            return False
        with self._lock:
            try:
                model = load(copy)
            except (ArtifactError, OSError):
                return False  # pruned or unreadable: the master's own model stands
            self.current, self._snapshot, self.loaded_at = model, copy, time.time()
            self._signature = self._stat()
        log.info("master takes up the last good model %s %s for new workers", model.kind,
                 model.version)
        return True

    def maybe_reload(self) -> bool:
        """Reload if ``watch_s`` has passed and the file changed (mtime, size, inode); True if swapped.

        Costs a clock read when not due and one ``stat`` when due. ``watch_s <= 0`` disables it.
        """
        if self.watch_s <= 0 or time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + self.watch_s
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        return self.reload(signature)

    def reload(self, signature: tuple[int, int, int] | None = None) -> bool:
        """Load the file now (SIGHUP); swap it in if valid, else keep serving the old model."""
        with self._lock:
            self._signature = signature or self._stat()
            try:
                model = self._load()
            except ArtifactError as exc:
                self.refused += 1
                self.last_error = str(exc)
                metrics.MODEL_RELOADS.labels(outcome="refused").inc()
                log.error("model reload refused, still serving %s: %s", self.current.version, exc)
                return False
            self.current = model  # one reference assignment: in-flight requests keep theirs
            self.loaded_at = time.time()
            self.reloads += 1
            self.last_error = None
            metrics.MODEL_RELOADS.labels(outcome="loaded").inc()
            log.info("model reloaded from %s: %s %s", self.path, model.kind, model.version)
            return True

    def start_watcher(self) -> threading.Thread | None:
        """Check the file every ``watch_s`` from a daemon thread (started by the ``post_fork`` hook, in
        the worker)."""
        if self.watch_s <= 0:
            return None

        def watch() -> None:
            while True:
                time.sleep(self.watch_s)
                try:
                    self.maybe_reload()
                except Exception:  # the watcher must outlive any surprise; the old model serves
                    log.exception("model watcher")

        thread = threading.Thread(target=watch, name="model-watcher", daemon=True)
        thread.start()
        return thread

    def status(self) -> dict[str, Any]:
        """What /readyz reports about the model."""
        m = self.current
        return {"loaded": True, "path": str(self.path), "kind": m.kind, "version": m.version,
                "hash_bits": m.hash_bits,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "reloads": self.reloads, "refused": self.refused, "last_error": self.last_error}
