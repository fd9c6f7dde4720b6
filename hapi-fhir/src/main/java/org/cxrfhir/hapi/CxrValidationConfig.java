package org.cxrfhir.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.config.JpaConfig;
import ca.uhn.fhir.parser.IParser;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.validation.IInstanceValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Qualifier;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.core.io.Resource;
import org.springframework.core.io.support.PathMatchingResourcePatternResolver;

import java.io.IOException;
import java.io.InputStreamReader;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.util.List;

/**
 * Offline validation of every write against base R4.
 *
 * <p>HAPI's JPA validation chain already holds the bundled R4 definitions, an in-memory
 * terminology service and any StructureDefinition/CodeSystem/ValueSet stored in the server;
 * no remote terminology server and no IG package is configured, so nothing leaves the machine.
 * Definitions that cxr-fhir needs beyond base R4 (AI-transparency extensions, security label
 * codes) go into {@code src/main/resources/cxr-fhir/definitions/} and are put at the head of
 * that chain here.
 */
@Configuration
public class CxrValidationConfig {

	private static final Logger ourLog = LoggerFactory.getLogger(CxrValidationConfig.class);

	@Bean
	public PrePopulatedValidationSupport cxrExtraDefinitions(
			FhirContext fhirContext,
			CxrProperties props,
			@Qualifier(JpaConfig.JPA_VALIDATION_SUPPORT_CHAIN) ValidationSupportChain jpaChain)
			throws IOException {
		PrePopulatedValidationSupport extra = new PrePopulatedValidationSupport(fhirContext);
		IParser parser = fhirContext.newJsonParser();
		Resource[] files = new PathMatchingResourcePatternResolver().getResources(props.getExtraDefinitions());
		for (Resource file : files) {
			try (Reader reader = new InputStreamReader(file.getInputStream(), StandardCharsets.UTF_8)) {
				IBaseResource resource = parser.parseResource(reader);
				extra.addResource(resource);
				ourLog.info("Loaded validation definition {} from {}", resource.getIdElement(), file.getFilename());
			}
		}
		// Always at the head of the chain: CxrConformance adds code-system amendments to it at
		// start-up, after this bean is made.
		jpaChain.addValidationSupport(0, extra);
		return extra;
	}

	/**
	 * Validates the body of every create, update and transaction/batch Bundle (entries are
	 * validated as part of the Bundle) before anything is stored. Only ERROR fails a request:
	 * codes from systems we do not hold (LOINC, SNOMED CT, RadLex) come back as warnings.
	 */
	@Bean
	@ConditionalOnProperty(prefix = "cxr", name = "validate-requests", havingValue = "true", matchIfMissing = true)
	public RequestValidatingInterceptor requestValidatingInterceptor(
			IInstanceValidatorModule instanceValidator, PrePopulatedValidationSupport cxrExtraDefinitions) {
		RequestValidatingInterceptor interceptor = new RequestValidatingInterceptor();
		interceptor.setValidatorModules(List.of(instanceValidator));
		interceptor.setFailOnSeverity(ResultSeverityEnum.ERROR);
		// Warnings about unknown code systems on every response would only bloat headers.
		interceptor.setAddResponseHeaderOnSeverity(null);
		return interceptor;
	}
}
