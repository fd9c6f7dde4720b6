"""The study id and correlation id of the job a log line was written in, as record fields.

A job runs :func:`job_context`; every log record written inside it (by our code or a library)
gets ``study_id`` and ``correlation_id`` attributes from :class:`ContextFilter`, which the
roof's formatter (``fhir_service.ops.logs``) prints as fields — ``key=value`` or JSON — so a
failed Task's correlation id finds its traceback with one grep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["FIELDS", "ContextFilter", "current", "job_context"]

#: The structured fields every record carries (None outside a job).
FIELDS = ("study_id", "correlation_id")

_study_id: ContextVar[str | None] = ContextVar("cxr_study_id", default=None)
_correlation_id: ContextVar[str | None] = ContextVar("cxr_correlation_id", default=None)


@contextmanager
def job_context(study_id: str, correlation_id: str) -> Iterator[None]:
    study_token = _study_id.set(study_id)
    cid_token = _correlation_id.set(correlation_id)
    try:
        yield
    finally:
        _correlation_id.reset(cid_token)
        _study_id.reset(study_token)


def current() -> dict[str, str | None]:
    return {"study_id": _study_id.get(), "correlation_id": _correlation_id.get()}


class ContextFilter(logging.Filter):
    """Adds the job's fields to every record (set on handlers, so library loggers get them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True
