"""Resumable progress of ``cxr ingest``: the committed line ranges of one (metadata file, FHIR
server, images dir), in a small JSON file that several processes may share."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fhir_service.fhir.client import FhirClient
from fhir_service.ingest.nih import NihRecord
from fhir_service.ingest.transaction import IMAGE_INDEX_SYSTEM

__all__ = ["ProgressState", "state_for", "state_is_live"]


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _ranges(lines: Iterable[int]) -> list[tuple[int, int]]:
    return _merge((n, n) for n in lines)


class ProgressState:
    """Committed line ranges of one (metadata file, FHIR server, images dir), on disk.

    Several processes may share the file: every save takes an exclusive ``flock``, re-reads,
    merges and replaces it atomically, so no process loses another's progress.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.done: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        if self.path.is_file():
            self.done = _merge(tuple(r) for r in self._read().get("done", []))

    def _read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def contains(self, line: int) -> bool:
        # Few ranges (they merge as batches complete), so a scan is fine.
        return any(lo <= line <= hi for lo, hi in self.done)

    def last_line(self) -> int | None:
        return self.done[-1][1] if self.done else None

    def add(self, lines: Iterable[int]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.path.with_suffix(".lock")
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    on_disk = [tuple(r) for r in self._read().get("done", [])]
                    self.done = _merge([*self.done, *on_disk, *_ranges(lines)])
                    tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({**self.meta, "done": self.done}))
                    tmp.replace(self.path)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def reset(self) -> None:
        self.done = []
        self.path.unlink(missing_ok=True)


def state_for(
    state_dir: Path, metadata: Path, images_dir: Path | None, sha: str, base_url: str
) -> ProgressState:
    """The progress file of one (metadata file, FHIR server, images dir)."""
    images = str(images_dir.resolve()) if images_dir else ""
    # One state per (file, server, images dir): loading metadata alone and later with images
    # are different jobs, and so are two servers. Not per bbox file: boxes of resumed rows
    # are checked on the server instead (few), so adding boxes never re-sends 112k rows.
    target = hashlib.sha256(f"{base_url}\n{images}".encode()).hexdigest()[:12]
    path = state_dir / f"nih-{sha[:16]}-{target}.json"
    return ProgressState(
        path, {"metadata": str(metadata), "sha256": sha, "fhir": base_url, "images": images}
    )


def state_is_live(fhir: FhirClient, state: ProgressState, rows: dict[int, NihRecord]) -> bool:
    """Does the server still hold the last study the state says was committed?"""
    last = state.last_line()
    if last is None:
        return True
    rec = rows.get(last)
    if rec is None:
        return True  # the line is beyond --limit or invalid now; nothing to check against
    found = fhir.count("ImagingStudy", {"identifier": f"{IMAGE_INDEX_SYSTEM}|{rec.image_index}"})
    return found > 0
