"""What the FHIR builder tests check every resource against: R4 (4.0.1) element names, to
catch misspelt keys that HAPI would reject as unknown, and the codes every AI output carries."""

from __future__ import annotations

from typing import Any

Resource = dict[str, Any]
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
UCUM = "http://unitsofmeasure.org"

_COMMON = {
    "resourceType",
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
}
R4_ELEMENTS = {
    "Device": _COMMON
    | {
        "identifier", "definition", "udiCarrier", "status", "statusReason", "distinctIdentifier",
        "manufacturer", "manufactureDate", "expirationDate", "lotNumber", "serialNumber",
        "deviceName", "modelNumber", "partNumber", "type", "specialization", "version",
        "property", "patient", "owner", "contact", "location", "url", "note", "safety", "parent",
    },
    "Observation": _COMMON
    | {
        "identifier", "basedOn", "partOf", "status", "category", "code", "subject", "focus",
        "encounter", "effectiveDateTime", "issued", "performer", "valueQuantity",
        "dataAbsentReason", "interpretation", "note", "bodySite", "method", "specimen", "device",
        "referenceRange", "hasMember", "derivedFrom", "component",
    },
    "Media": _COMMON
    | {
        "identifier", "basedOn", "partOf", "status", "type", "modality", "view", "subject",
        "encounter", "createdDateTime", "issued", "operator", "reasonCode", "bodySite",
        "deviceName", "device", "height", "width", "frames", "duration", "content", "note",
    },
    "DiagnosticReport": _COMMON
    | {
        "identifier", "basedOn", "status", "category", "code", "subject", "encounter",
        "effectiveDateTime", "issued", "performer", "resultsInterpreter", "specimen", "result",
        "imagingStudy", "media", "conclusion", "conclusionCode", "presentedForm",
    },
    "Provenance": _COMMON
    | {
        "target", "occurredDateTime", "recorded", "policy", "location", "reason", "activity",
        "agent", "entity", "signature",
    },
    "DocumentReference": _COMMON
    | {
        "masterIdentifier", "identifier", "status", "docStatus", "type", "category", "subject",
        "date", "author", "authenticator", "custodian", "relatesTo", "description",
        "securityLabel", "content", "context",
    },
    "Task": _COMMON
    | {
        "identifier", "basedOn", "groupIdentifier", "partOf", "status", "statusReason",
        "businessStatus", "intent", "priority", "code", "description", "focus", "for",
        "encounter", "executionPeriod", "authoredOn", "lastModified", "requester", "owner",
        "reasonCode", "note", "restriction", "input", "output",
    },
}  # fmt: skip
