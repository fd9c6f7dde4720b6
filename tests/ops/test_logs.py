"""Log lines carry the job's study id and correlation id as fields (text and JSON)."""

from __future__ import annotations

import json
import logging

from fhir_service.ops.logs import FieldsFormatter, JsonFormatter
from subscriptions.logcontext import ContextFilter, job_context


def _record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("cxr.test", logging.WARNING, __file__, 1, message, None, None)
    ContextFilter().filter(record)
    return record


def test_fields_appear_inside_a_job_only() -> None:
    with job_context("123", "abc123def456"):
        inside = _record("giving up")
    outside = _record("idle")
    text = FieldsFormatter().format(inside)
    assert text.endswith("giving up study_id=123 correlation_id=abc123def456")
    assert FieldsFormatter().format(outside).endswith("cxr.test: idle")
    as_json = json.loads(JsonFormatter().format(inside))
    assert as_json["study_id"] == "123" and as_json["correlation_id"] == "abc123def456"
    assert as_json["message"] == "giving up" and as_json["level"] == "WARNING"
    assert "study_id" not in json.loads(JsonFormatter().format(outside))


def test_a_traceback_stays_below_the_line_with_the_fields() -> None:
    try:
        raise KeyError("surprise")
    except KeyError:
        import sys

        with job_context("9", "c1"):
            record = _record("internal error")
        record.exc_info = sys.exc_info()
    first, *rest = FieldsFormatter().format(record).splitlines()
    assert first.endswith("internal error study_id=9 correlation_id=c1")
    assert any("KeyError" in line for line in rest)
