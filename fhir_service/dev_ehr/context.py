"""What every dev-EHR route needs (settings, keys, grants, the HAPI client), and its
``Annotated`` alias for route signatures."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qsl

import httpx
from fastapi import Depends, Request

from fhir_service.dev_ehr.store import GrantStore
from fhir_service.dev_ehr.tokens import TokenService
from fhir_service.settings import DevEhrClient, Settings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
#: Fields of a Patient the launcher and the picker show.
_PATIENT_ELEMENTS = "name,gender,birthDate,identifier"


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(value: str) -> bool:
    """A FHIR resource id (R4 §2.26.0.1), and not a relative path segment."""
    return bool(_FHIR_ID.fullmatch(value)) and value.strip(".") != ""


class FormError(Exception):
    """The request body is not a well-formed ``application/x-www-form-urlencoded`` form."""


@dataclass
class DevEhr:
    settings: Settings
    store: GrantStore
    tokens: TokenService
    upstream: httpx.AsyncClient
    clock: Callable[[], float] = time.time
    clients: dict[str, DevEhrClient] = field(default_factory=dict)
    #: The signed-in user's Practitioner exists in HAPI (see writes.ensure_user).
    user_ensured: bool = False

    @property
    def issuer(self) -> str:
        return self.settings.dev_ehr_url

    @property
    def fhir_base(self) -> str:
        return self.settings.dev_ehr_fhir_url

    @property
    def fhir_user(self) -> str:
        """The signed-in user as an absolute FHIR URL (SMART's ``fhirUser`` claim)."""
        return f"{self.fhir_base}/{self.settings.dev_ehr_user}"

    async def list_patients(self, count: int = 100) -> list[dict[str, Any]]:
        resp = await self.upstream.get(
            "Patient",
            params={"_count": str(count), "_sort": "-_lastUpdated", "_elements": _PATIENT_ELEMENTS},
        )
        resp.raise_for_status()
        return [e["resource"] for e in resp.json().get("entry", []) if "resource" in e]

    async def patient_exists(self, patient_id: str) -> bool:
        if not is_fhir_id(patient_id):
            return False
        resp = await self.upstream.get(f"Patient/{patient_id}", params={"_elements": "id"})
        return resp.status_code == 200

    async def aclose(self) -> None:
        await self.upstream.aclose()
        self.store.close()


def get_ehr(request: Request) -> DevEhr:
    ehr: DevEhr = request.app.state.ehr
    return ehr


EhrDep = Annotated[DevEhr, Depends(get_ehr)]


async def form_params(request: Request) -> dict[str, str]:
    """The form fields of a POST; a repeated field is refused (RFC 6749 §3.1)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError("the body must be application/x-www-form-urlencoded")
    pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise FormError(f"parameter {key!r} appears more than once")
        params[key] = value
    return params
