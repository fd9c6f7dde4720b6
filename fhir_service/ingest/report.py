"""What one ``cxr ingest`` run did: counts, the rows and box lines it left out with their
reasons, and the machine-readable report file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fhir_service.ingest.nih import BadLine

__all__ = ["IngestReport"]


@dataclass
class IngestReport:
    """What happened; :meth:`as_json` is the machine-readable report file."""

    metadata: str
    metadata_sha256: str
    fhir_base_url: str
    images: str | None
    started: str
    wall_s: float
    rows_read: int
    rows_valid: int
    rows_created: int
    """rows whose ImagingStudy this run created"""
    rows_already_present: int
    """rows whose ImagingStudy was already on the server (earlier run, concurrent run)"""
    rows_resumed: int
    """rows committed by an earlier, interrupted run (not sent again)"""
    rows_with_images: int
    studies_activated: int
    """existing ``registered`` studies whose image arrived in this run (now ``available``)"""
    created: dict[str, int]
    already_present: dict[str, int]
    skipped: list[BadLine]
    failed: list[BadLine]
    inference: dict[str, int]
    state_file: str
    conflicts_retried: int = 0
    """transactions and updates sent again after a concurrent writer won a race (409/412)"""
    bbox: str | None = None
    boxes_read: int = 0
    """box lines in the bounding-box file (valid or not)"""
    boxes_written: int = 0
    """boxes this run put on studies (new studies, or existing ones that lacked them)"""
    boxes_already_present: int = 0
    studies_boxes_updated: int = 0
    """existing studies updated because their boxes differed from the file"""
    boxes_skipped: list[BadLine] = field(default_factory=list)
    """box lines not attached, with the reason (boxes_read = written + present + skipped)"""

    @property
    def resources_written(self) -> int:
        return sum(self.created.values()) + sum(self.already_present.values())

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(_reason_kind(b.reason) for b in self.skipped).most_common())

    @property
    def boxes_skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(_box_reason_kind(b.reason) for b in self.boxes_skipped).most_common())

    def as_json(self) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "metadata_sha256": self.metadata_sha256,
            "fhir_base_url": self.fhir_base_url,
            "images": self.images,
            "bbox": self.bbox,
            "started": self.started,
            "wall_s": round(self.wall_s, 3),
            "resources_per_s": round(self.resources_written / self.wall_s, 1)
            if self.wall_s
            else None,
            "rows": {
                "read": self.rows_read,
                "valid": self.rows_valid,
                "created": self.rows_created,
                "already_present": self.rows_already_present,
                "resumed": self.rows_resumed,
                "skipped": len(self.skipped),
                "failed": len(self.failed),
                "with_images": self.rows_with_images,
                "activated": self.studies_activated,
            },
            "created": self.created,
            "already_present": self.already_present,
            "conflicts_retried": self.conflicts_retried,
            "skipped_by_reason": self.skipped_by_reason,
            "skipped": [b.__dict__ for b in self.skipped],
            "failed": [b.__dict__ for b in self.failed],
            "boxes": {
                "read": self.boxes_read,
                "written": self.boxes_written,
                "already_present": self.boxes_already_present,
                "skipped": len(self.boxes_skipped),
                "studies_updated": self.studies_boxes_updated,
            },
            "boxes_skipped_by_reason": self.boxes_skipped_by_reason,
            "boxes_skipped": [b.__dict__ for b in self.boxes_skipped],
            "inference": self.inference,
            "state_file": self.state_file,
        }


def _reason_kind(reason: str) -> str:
    # "age 130 out of range 0..120" → "age out of range": group by the reason's wording.
    for kind in (
        "unknown gender",
        "out of range",
        "duplicate image index",
        "missing column",
        "contradicts",
        "follow-up #",
        "fields, the header has",
        "not an integer",
        "unknown view position",
        "bad number",
        "empty image index",
    ):
        if kind in reason:
            return kind
    return reason


_BOX_REASONS = (
    "unknown finding",
    "image not among the metadata rows read",
    "image index not in the metadata",
    "metadata row was skipped",
    "its row failed",
    "study is not on the server",
    "duplicate box",
    "outside the",
    "empty box",
    "finite",
    "bad number",
    "a box needs",
    "unexpected values",
    "empty image index",
)


def _box_reason_kind(reason: str) -> str:
    return next((kind for kind in _BOX_REASONS if kind in reason), reason)
