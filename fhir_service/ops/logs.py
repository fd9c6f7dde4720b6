"""Log lines with fields: the study id and correlation id of the job that wrote them.

``text`` (default): ``time LEVEL logger: message study_id=12 correlation_id=3f2a…``, the fields
only when set; ``json``: one object per line with the same keys, for a log pipeline
(``CXR_LOG_FORMAT=json``). The fields come from :mod:`subscriptions.logcontext`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from subscriptions.logcontext import FIELDS, ContextFilter

__all__ = ["FieldsFormatter", "JsonFormatter", "configure_logging"]


class FieldsFormatter(logging.Formatter):
    """The plain format plus ``key=value`` for each structured field that is set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{name}={value}" for name in FIELDS if (value := getattr(record, name, None))
        )
        if not fields:
            return line
        head, sep, trace = line.partition("\n")
        return f"{head} {fields}{sep}{trace}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if (value := getattr(record, name, None)) is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: int, fmt: Literal["text", "json"] = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else FieldsFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
