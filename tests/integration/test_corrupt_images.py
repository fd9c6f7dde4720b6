"""Corrupt images through the real stack: each study ends in one failed Task with a reason a
person can read — never a study with neither a report nor a Task (the fuzz suite in
tests/models/test_decode_fuzz.py covers the decoder itself, without servers)."""

from __future__ import annotations

import io
import struct

import pytest

from fhir_service.fhir.tasks import task_business_status
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration


def _nih(stack: Stack, index: int) -> bytes:
    rec = stack.records[index]
    return (stack.settings.shared_dir / "data" / "nih-sample" / rec.image_index).read_bytes()


def _jpeg(stack: Stack) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(_nih(stack, 0))).convert("L").save(out, format="JPEG", quality=90)
    return out.getvalue()


def _corrupt(stack: Stack) -> dict[str, tuple[bytes, str]]:
    png = _nih(stack, 40)
    jpeg = _jpeg(stack)
    dicom = (stack.settings.shared_dir / "data" / "dicom" / "RG1_UNCR.dcm").read_bytes()
    pixel = dicom.rfind(b"\xe0\x7f\x10\x00")
    ihdr_bad_crc = png[:29] + struct.pack(">I", 0xDEADBEEF) + png[33:]
    return {
        # the case: OSError "Truncated File Read" from PIL.Image.open itself
        "png garbage first chunk": (b"\x89PNG\r\n\x1a\n" + b"not really a png", "corrupt"),
        "png cut in half": (png[: len(png) // 2], "truncated or corrupt"),
        "png with a bad IHDR checksum": (ihdr_bad_crc, "not a recognised image format"),
        "jpeg cut after its headers": (jpeg[:700], "truncated or corrupt"),
        "dicom cut inside its pixel data": (dicom[: pixel + 5000], "cannot decode DICOM pixel"),
    }


def test_each_corrupt_image_ends_in_one_failed_task_with_a_reason(stack: Stack) -> None:
    cases = _corrupt(stack)
    posted = {
        name: stack.post_study(41 + i, image=data)
        for i, (name, (data, _)) in enumerate(cases.items())
    }
    for name, sid in posted.items():
        task = wait_for(
            f"a failed Task for the {name}",
            lambda sid=sid: (t := stack.task(sid)) and t["status"] == "failed" and t,
            timeout_s=180,
        )
        reason = task["statusReason"]["text"]
        assert cases[name][1].lower() in reason.lower(), (name, reason)
        assert reason.startswith("Media/"), reason  # names where the bad pixels are
        assert task_business_status(task) == "undecodable-image", (name, task)
        assert not stack.reports(sid)
    wait_for("the queue to drain", stack.drained, timeout_s=120)
    # no job was retried: bad input fails at once
    failed_jobs = [j for j in stack.jobs("failed") if j[2] in posted.values()]
    assert failed_jobs == []
