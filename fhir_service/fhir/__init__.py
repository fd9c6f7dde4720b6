"""The FHIR layer (ground floor): client, terminology, identifiers and resource builders.

Imports nothing above it (no Settings, no subscriptions, no roof); ``models.types`` is the
one thing it takes from the model layer, to describe an analysis as FHIR.

==================  ===============================================================
``client``          a thin R4 REST client over httpx (errors mapped to cxr_errors)
``terminology``     ``codes.json``: every code, system and URI written, in one file
``identifiers``     the idempotency keys: report, study-model, Task
``datatypes``       small datatype builders (CodeableConcept, Reference, Quantity …)
``studies``         what is read from an ImagingStudy; the study extensions
``results``         the result transaction (Device, Observations, Media, report, Provenance)
``supersede``       withdrawing a report whose image changed
``tasks``           the study's analysis Task (failed / completed)
``outcome``         OperationOutcome bodies and text
``inbound``         parsing of inbound resources with fhir.resources (R4B) models
==================  ===============================================================
"""
