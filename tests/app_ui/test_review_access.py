"""Who may review from the app: the launch's fhirUser Practitioner, with the write scopes;
a read-only launch gets no review and no upload, and a submission is refused before any
write reaches the EHR."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_errors import ForbiddenError
from fhir_service.app_ui import review, smart
from fhir_service.fhir.review import ReviewDecision
from tests.app_ui.test_user_mode import ISS, Harness


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    h = Harness(tmp_path, mode="patient")
    assert h.session.tokens is not None
    h.session.tokens.fhir_user = f"{ISS}/Practitioner/rad-1"
    return h


def test_reviewer_is_the_fhir_user_practitioner(h: Harness) -> None:
    assert review.reviewer(h.session) == "Practitioner/rad-1"
    assert h.session.tokens is not None
    h.session.tokens.fhir_user = f"{ISS}/Patient/p1"
    assert review.reviewer(h.session) is None, "a patient is no reviewer"
    h.session.tokens.fhir_user = "https://elsewhere.test/fhir/Practitioner/rad-1"
    assert review.reviewer(h.session) is None, "a user of another server is not ours"


def test_write_scopes_decide_review_and_upload(h: Harness) -> None:
    assert h.session.tokens is not None
    assert not review.can_review(h.session) and not review.can_upload(h.session)
    h.session.tokens.scope = f"{smart.RESOURCE_SCOPES} {smart.WRITE_SCOPES}"
    assert review.can_review(h.session) and review.can_upload(h.session)
    # Only part of what a review writes: no review.
    h.session.tokens.scope = f"{smart.RESOURCE_SCOPES} patient/Observation.cu"
    assert not review.can_review(h.session)
    # user/ write scopes do not count in a patient launch.
    h.session.tokens.scope = f"{smart.RESOURCE_SCOPES} {smart.USER_WRITE_SCOPES}"
    assert not review.can_review(h.session)


def test_a_read_only_launch_cannot_submit(h: Harness) -> None:
    with pytest.raises(ForbiddenError, match="write scopes"):
        h.run(
            lambda ui: review.submit(
                ui, h.session, "s1", [ReviewDecision("o1", "agree")], "r-12345678"
            )
        )
    assert h.ehr.requests == [], "nothing was asked of the EHR"
