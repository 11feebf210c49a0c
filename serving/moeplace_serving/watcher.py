"""Follow a mounted placement ConfigMap directory and keep the last good placement.

The kubelet writes a ConfigMap volume (mounted without subPath) as::

    DIR/..2026_11_22_05_40_00.123456789/placement.json   the files of one version
    DIR/..data -> ..2026_11_22_05_40_00.123456789        swapped atomically (rename) on update
    DIR/placement.json -> ..data/placement.json          one symlink per key

The watcher polls ``readlink(DIR/..data)`` (no inotify; default every second; the kubelet itself
propagates an update within about a minute) and, when the target changes, reads the keys from the
resolved timestamped directory so all keys come from one version. Outside a kubelet layout
(a plain directory) the key file's mtime and size stand in for the symlink target.

Keys read: ``placement.json`` (canonical placement JSON), ``version`` (optional integer; else
``metadata.version`` of the placement; versions must increase) and ``hash`` (optional; must equal
``Placement.content_hash()``). A version is accepted only if it parses, passes
:func:`placement.validate`, matches the serving shape and is newer than the last good one;
otherwise the last good one stays and the reason is logged, counted in
``moe_placement_reloads_total{result="invalid"}`` and passed to ``on_error``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from moeplace_serving.metrics import ServingMetrics
from placement import InvalidPlacementError, Placement, validate
from placement.names import HASH_KEY, PLACEMENT_KEY, VERSION_KEY

log = logging.getLogger(__name__)

DATA_LINK = "..data"


class PlacementCheck(Protocol):
    """What the watcher asks of the serving side: raise InvalidPlacementError if it cannot
    load ``placement`` (:class:`ServingShape`; the engine plugins' ``EngineShape``)."""

    def check(self, placement: Placement) -> None: ...


@dataclass(frozen=True)
class ServingShape:
    """What this serving group can load: MoE layers, experts per layer, ranks (GPUs)."""

    layers: int
    experts: int
    num_gpus: int

    def check(self, placement: Placement) -> None:
        """Raise :class:`InvalidPlacementError` if ``placement`` does not fit this group."""
        got = (placement.model.moe_layers, placement.model.experts, placement.num_gpus)
        if got != (self.layers, self.experts, self.num_gpus):
            raise InvalidPlacementError(
                f"placement is for (layers, experts, gpus) = {got}, serving has "
                f"{(self.layers, self.experts, self.num_gpus)}"
            )
        validate(placement)  # the stand-in's ranks hold one copy of an expert per GPU


@dataclass(frozen=True)
class PlacementVersion:
    """One accepted placement: its integer version, the placement and where it came from."""

    version: int
    placement: Placement
    revision: str


class PlacementRejectedError(ValueError):
    """A placement version that the watcher refuses; the message says why."""


ErrorCallback = Callable[[str, str], None]  # (revision, reason)
UpdateCallback = Callable[[PlacementVersion], None]


class PlacementWatcher:
    """Poll ``directory`` for new placement versions; keep the last ``keep`` good ones."""

    def __init__(
        self,
        directory: Path,
        expect: PlacementCheck | None = None,
        poll_interval_s: float = 1.0,
        on_update: UpdateCallback | None = None,
        on_error: ErrorCallback | None = None,
        metrics: ServingMetrics | None = None,
        keep: int = 4,
    ) -> None:
        self.directory = Path(directory)
        self.expect, self.poll_interval_s, self.keep = expect, poll_interval_s, keep
        self.on_update, self.on_error, self.metrics = on_update, on_error, metrics
        self.last_error: str | None = None
        self._seen_revision: str | None = None
        self._history: dict[int, PlacementVersion] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> PlacementVersion | None:
        """The newest accepted version, or None before the first."""
        with self._lock:
            return self._history[max(self._history)] if self._history else None

    def get(self, version: int) -> PlacementVersion | None:
        """Accepted version ``version`` if still kept."""
        with self._lock:
            return self._history.get(version)

    def poll(self) -> PlacementVersion | None:
        """Check once; return the newly accepted version, or None (no change, or refused)."""
        revision = self._revision()
        if revision is None or revision == self._seen_revision:
            return None
        try:
            accepted = self._load(revision)
        except FileNotFoundError:
            return None  # the kubelet swapped the directory while we read: retry next poll
        except PlacementRejectedError as err:
            self._seen_revision = revision
            self._refuse(revision, str(err))
            return None
        self._seen_revision = revision
        if accepted is not None:
            self._accept(accepted)
        return accepted

    def start(self) -> None:
        """Poll every ``poll_interval_s`` from a daemon thread (first poll right away)."""
        self._thread = threading.Thread(target=self._run, name="placement-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_interval_s)

    def _revision(self) -> str | None:
        link = self.directory / DATA_LINK
        if link.is_symlink():
            return str(link.readlink())
        try:
            stat = (self.directory / PLACEMENT_KEY).stat()
        except FileNotFoundError:
            return None
        return f"mtime={stat.st_mtime_ns},size={stat.st_size}"

    def _load(self, revision: str) -> PlacementVersion | None:
        """Read and check the version in ``revision``; None if it is the latest already."""
        link = self.directory / DATA_LINK
        base = self.directory / revision if link.is_symlink() else self.directory
        placement = _parse(base)
        version = _version(base, placement)
        latest = self.latest
        if latest is not None and version <= latest.version:
            if placement.content_hash() == latest.placement.content_hash():
                return None  # the same tables (e.g. republished after a reset): nothing to do
            raise PlacementRejectedError(
                f"version {version} is not newer than the loaded version {latest.version}"
            )
        try:
            # An engine check decides about two copies of an expert on one GPU (DeepSeek's
            # EPLB output; SGLang with DeepEP cannot load it); without one they are refused.
            validate(placement, allow_duplicates=self.expect is not None)
            if self.expect is not None:
                self.expect.check(placement)
        except InvalidPlacementError as err:
            raise PlacementRejectedError(f"invalid placement: {err}") from err
        return PlacementVersion(version, placement, revision)

    def _accept(self, accepted: PlacementVersion) -> None:
        with self._lock:
            self._history[accepted.version] = accepted
            for old in sorted(self._history)[: -self.keep]:
                del self._history[old]
        self.last_error = None
        log.info("placement version %d accepted (%s)", accepted.version, accepted.revision)
        if self.metrics is not None:
            self.metrics.reloads_ok.inc()
            self.metrics.latest_version.set(accepted.version)
        if self.on_update is not None:
            self.on_update(accepted)

    def _refuse(self, revision: str, reason: str) -> None:
        self.last_error = reason
        kept = self.latest
        log.warning(
            "placement %s refused, keeping version %s: %s",
            revision,
            kept.version if kept else None,
            reason,
        )
        if self.metrics is not None:
            self.metrics.reloads_invalid.inc()
        if self.on_error is not None:
            self.on_error(revision, reason)


def _parse(base: Path) -> Placement:
    """Parse ``base/placement.json``; also checks ``base/hash`` when present."""
    text = (base / PLACEMENT_KEY).read_text()
    try:
        placement = Placement.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlacementRejectedError(
            f"cannot parse {PLACEMENT_KEY}: {where}: {first['msg']}"
        ) from err
    hash_file = base / HASH_KEY
    if hash_file.exists():
        expected = hash_file.read_text().strip()
        if expected != placement.content_hash():
            raise PlacementRejectedError(
                f"hash key {expected} does not match the placement ({placement.content_hash()})"
            )
    return placement


def _version(base: Path, placement: Placement) -> int:
    """The integer version: the ``version`` key, else ``metadata.version``."""
    version_file = base / VERSION_KEY
    raw = version_file.read_text().strip() if version_file.exists() else None
    if raw is None:
        value = placement.metadata.get("version")
        raw = str(value) if value is not None else None
    if raw is None or not raw.isdigit():
        raise PlacementRejectedError(
            f"no integer version (key {VERSION_KEY!r} or metadata.version), got {raw!r}"
        )
    return int(raw)
