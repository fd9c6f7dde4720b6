"""OperationOutcome: the one body built for an error, and its readable text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["operation_outcome", "outcome_text"]


def operation_outcome(
    text: str, *, severity: str = "error", code: str = "processing"
) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


def outcome_text(body: Any) -> str:
    """The human-readable part of an OperationOutcome (or the raw body)."""
    if isinstance(body, Mapping) and body.get("resourceType") == "OperationOutcome":
        parts = []
        issues = body.get("issue", [])
        # A refused write lists every warning too; the errors are what explain the refusal.
        errors = [i for i in issues if i.get("severity") in ("error", "fatal")]
        for issue in errors or issues:
            text = issue.get("diagnostics") or issue.get("details", {}).get("text") or ""
            where = ",".join(issue.get("expression", []) or issue.get("location", []))
            parts.append(f"{issue.get('severity', '?')}: {text}" + (f" @ {where}" if where else ""))
        text = "; ".join(parts) or "OperationOutcome without issues"
        return text if len(text) <= 4000 else text[:4000] + " …"
    return str(body)[:500]
