package org.cxrfhir.hapi;

/**
 * Marker for HAPI plain providers (classes with {@code @Operation} methods, not tied to one
 * resource provider) that the server should register. Any Spring bean in this package tree
 * implementing it is registered on the {@code /fhir} servlet at start-up; nothing else is
 * needed to add an operation such as {@code ImagingStudy/$similar}.
 */
public interface PlainProvider {}
