package org.cxrfhir.hapi;

import org.springframework.boot.context.properties.ConfigurationProperties;

import java.util.List;

/**
 * Settings of our own, under the {@code cxr.} prefix. The Python side passes them as
 * {@code --cxr.subscription-interval-ms=...} and so on.
 */
@ConfigurationProperties(prefix = "cxr")
public class CxrProperties {

	/**
	 * How often HAPI moves persisted resource changes to the subscription matcher. HAPI's
	 * default (5 s) puts that much delay between an ImagingStudy arriving and our rest-hook
	 * seeing it; each pass is one small query, so 100 ms costs HAPI ~2.5 % of a core when idle.
	 */
	private long subscriptionIntervalMs = 100;

	/** Origins allowed by CORS (the SMART app is served from another origin). */
	private List<String> corsOrigins = List.of("*");

	/**
	 * Hibernate dialect class. Empty: chosen from the JDBC URL (H2 or PostgreSQL), because HAPI
	 * needs its own dialect subclasses and Hibernate's auto-detection would pick the plain ones.
	 */
	private String dialect = "";

	/** Validate every create/update/transaction against base R4 (and our extra definitions). */
	private boolean validateRequests = true;

	/** Classpath pattern of extra conformance resources (StructureDefinition, CodeSystem, ValueSet). */
	private String extraDefinitions = "classpath*:cxr-fhir/definitions/**/*.json";

	/** Base URL of the cxr-fhir service that answers {@code ImagingStudy/$similar}. */
	private String similarServiceUrl = "http://127.0.0.1:10001";

	/** Seconds to wait for the service before answering 503. */
	private int similarTimeoutSeconds = 30;

	public String getSimilarServiceUrl() {
		return similarServiceUrl;
	}

	public void setSimilarServiceUrl(String similarServiceUrl) {
		this.similarServiceUrl = similarServiceUrl;
	}

	public int getSimilarTimeoutSeconds() {
		return similarTimeoutSeconds;
	}

	public void setSimilarTimeoutSeconds(int similarTimeoutSeconds) {
		this.similarTimeoutSeconds = similarTimeoutSeconds;
	}

	public long getSubscriptionIntervalMs() {
		return subscriptionIntervalMs;
	}

	public void setSubscriptionIntervalMs(long subscriptionIntervalMs) {
		this.subscriptionIntervalMs = subscriptionIntervalMs;
	}

	public List<String> getCorsOrigins() {
		return corsOrigins;
	}

	public void setCorsOrigins(List<String> corsOrigins) {
		this.corsOrigins = corsOrigins;
	}

	public String getDialect() {
		return dialect;
	}

	public void setDialect(String dialect) {
		this.dialect = dialect;
	}

	public boolean isValidateRequests() {
		return validateRequests;
	}

	public void setValidateRequests(boolean validateRequests) {
		this.validateRequests = validateRequests;
	}

	public String getExtraDefinitions() {
		return extraDefinitions;
	}

	public void setExtraDefinitions(String extraDefinitions) {
		this.extraDefinitions = extraDefinitions;
	}
}
