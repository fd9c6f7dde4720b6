"""Terminology: ``codes.json`` is the one source of every code, system and URI cxr-fhir writes.

A terminology review edits that file only (shared/docs/FHIR_PROFILE.md, "Finding codes");
this module loads and checks it once (:data:`TERMINOLOGY`) and hands out CodeableConcepts
and CodeSystem resources. Raw dict access to the file stays inside :class:`Terminology`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

from models.types import NIH_FINDINGS

__all__ = [
    "TERMINOLOGY",
    "Coding",
    "FindingCode",
    "Resource",
    "Terminology",
    "finding_code",
    "finding_label",
    "load_terminology",
    "local_code_systems",
]

Resource = dict[str, Any]
Coding = dict[str, str]


@dataclass(frozen=True)
class FindingCode:
    """The codes of one NIH finding, as ``codes.json`` lists them."""

    label: str
    """the NIH ChestX-ray14 label, exactly as ``NIH_FINDINGS`` spells it"""
    text: str
    """what a clinician reads (``CodeableConcept.text``)"""
    codings: tuple[Coding, ...]
    """standard codings (SNOMED CT, DICOM, RadLex) in the order they are written"""
    verify: tuple[str, ...]
    """open terminology-review items for this finding ("system|code: reason")"""
    note: str | None

    @property
    def slug(self) -> str:
        return self.label.lower().replace("_", "-")


@dataclass(frozen=True)
class Terminology:
    """``codes.json``, checked on load. Raw dict access stays inside this class."""

    data: Mapping[str, Any]

    def concept(self, name: str) -> Coding:
        return _clean_coding(self.data["concepts"][name])

    def identifier_system(self, name: str) -> str:
        """Our own identifier systems (under ``local_base``), then standard ones (DICOM UIDs)."""
        local = self.data["identifier_systems"]
        return str(local[name] if name in local else self.data["standard_identifier_systems"][name])

    def code_system_url(self, name: str) -> str:
        return str(self.data["code_systems"][name]["url"])

    def extension_url(self, name: str) -> str:
        return str(self.data["extensions"][name])

    @property
    def device_name(self) -> str:
        return str(self.data["device"]["name"])

    @property
    def device_manufacturer(self) -> str:
        return str(self.data["device"]["manufacturer"])

    @cached_property
    def findings(self) -> Mapping[str, FindingCode]:
        out: dict[str, FindingCode] = {}
        for item in self.data["findings"]:
            codings = tuple(_clean_coding(c) for c in item["codings"])
            verify = tuple(
                f"{c['system']}|{c['code']}: {c['verify']}"
                for c in item["codings"]
                if "verify" in c
            )
            out[item["label"]] = FindingCode(
                label=item["label"],
                text=item["text"],
                codings=codings,
                verify=verify,
                note=item.get("note"),
            )
        return out

    @property
    def local_base(self) -> str:
        """Base URI of our local systems, identifiers and extensions."""
        return str(self.data["local_base"])


def _clean_coding(raw: Mapping[str, Any]) -> Coding:
    # "verify" is review bookkeeping and a null display means "write none": neither is FHIR.
    return {k: str(raw[k]) for k in ("system", "code", "display") if raw.get(k) is not None}


def load_terminology(text: str | None = None) -> Terminology:
    """Parse ``codes.json`` (or ``text``) and check that it covers exactly the 14 findings."""
    if text is None:
        text = resources.files("fhir_service.fhir").joinpath("codes.json").read_text("utf-8")
    term = Terminology(json.loads(text))
    labels = tuple(term.findings)
    if labels != NIH_FINDINGS:
        raise ValueError(f"codes.json findings {labels} differ from NIH_FINDINGS {NIH_FINDINGS}")
    for name in term.data["concepts"]:
        coding = term.concept(name)
        if not coding.get("system") or not coding.get("code"):
            raise ValueError(f"codes.json concept {name!r} lacks system or code")
    return term


TERMINOLOGY = load_terminology()


def finding_code(label: str, *, terminology: Terminology = TERMINOLOGY) -> Resource:
    """The CodeableConcept of one finding: standard codings, then the NIH label coding."""
    fc = terminology.findings[label]
    nih = {"system": terminology.code_system_url("nih_label"), "code": fc.label}
    return {"coding": [*map(dict, fc.codings), nih], "text": fc.text}


def local_code_systems(*, terminology: Terminology = TERMINOLOGY) -> list[Resource]:
    """CodeSystem resources for our local, closed code systems (NIH labels, model outputs).

    Loading them into the FHIR server (or HAPI's extra validation definitions) lets the
    validator check our local codes instead of warning that the systems are unknown.
    """
    concepts = terminology.data["concepts"]
    model_output = [
        {"code": c["code"], "display": c["display"]}
        for c in concepts.values()
        if c["system"] == terminology.code_system_url("model_output")
    ]
    nih = [{"code": f.label, "display": f.text} for f in terminology.findings.values()]
    out = []
    for key, members in (("nih_label", nih), ("model_output", model_output)):
        meta = terminology.data["code_systems"][key]
        out.append(
            {
                "resourceType": "CodeSystem",
                "id": key.replace("_", "-"),
                "url": meta["url"],
                "name": meta["name"],
                "title": meta["title"],
                "status": "active",
                "experimental": False,
                "description": meta["description"],
                "caseSensitive": True,
                "content": "complete",
                "count": len(members),
                "concept": members,
            }
        )
    return out


def finding_label(token: str, *, terminology: Terminology = TERMINOLOGY) -> str | None:
    """The NIH label for a token: the label itself (any case, ``_`` or space), one of the
    finding's codes, or ``system|code``; None when nothing matches."""
    system, _, code = token.rpartition("|")
    for label, fc in terminology.findings.items():
        if not system and code.lower().replace(" ", "_") == label.lower():
            return label
        for coding in fc.codings:
            if coding["code"] == code and (not system or coding["system"] == system):
                return label
        if system == terminology.code_system_url("nih_label") and code == label:
            return label
    return None
