"""cxr-fhir service layer: settings, FHIR client and resource builders, the app and the CLI."""
