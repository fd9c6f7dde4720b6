package org.cxrfhir.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirResourceDao;
import ca.uhn.fhir.rest.api.server.SystemRequestDetails;
import ca.uhn.fhir.rest.server.exceptions.ResourceNotFoundException;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.r4.model.CodeSystem;
import org.hl7.fhir.r4.model.CodeSystem.ConceptDefinitionComponent;
import org.hl7.fhir.r4.model.SearchParameter;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.SmartInitializingSingleton;
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
 * What cxr-fhir needs from the server beyond base R4, set up before the first request.
 *
 * <ul>
 *   <li>The security label {@code AIAST} ("artificial intelligence asserted") is newer than
 *       the R4 terminology HAPI bundles, so the validator refuses it. We add that one code to
 *       the bundled {@code v3-ObservationValue} code system instead of switching validation off.
 *   <li>R4 has no search parameter for {@code Media.partOf} (how the worker finds a study's
 *       pixels) nor for {@code Observation.interpretation} (analysts' "positive findings"
 *       query); both are stored as SearchParameter resources at start-up.
 *   <li>HAPI strips versions from references when it stores a resource; a Provenance must keep
 *       the exact study version the result was derived from.
 * </ul>
 */
@Configuration
public class CxrConformance {

	private static final Logger ourLog = LoggerFactory.getLogger(CxrConformance.class);
	static final String OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

	@Bean
	public SmartInitializingSingleton cxrConformanceSetup(
			FhirContext fhirContext,
			PrePopulatedValidationSupport cxrExtraDefinitions,
			DaoRegistry daoRegistry,
			ISearchParamRegistry searchParamRegistry,
			JpaStorageSettings storageSettings) {
		return () -> {
			fhirContext.getParserOptions().setDontStripVersionsFromReferencesAtPaths("Provenance.entity.what");
			addAiastCode(fhirContext, cxrExtraDefinitions);
			// This runs before the web server and batch2 are up, so the reindex job HAPI starts
			// after a SearchParameter change does not exist yet; and on a new database there is
			// nothing to reindex. Suspend it for these writes only (start-up is single-threaded).
			boolean reindex = storageSettings.isMarkResourcesForReindexingUponSearchParameterChange();
			storageSettings.setMarkResourcesForReindexingUponSearchParameterChange(false);
			try {
				storeSearchParameters(fhirContext, daoRegistry, searchParamRegistry);
			} finally {
				storageSettings.setMarkResourcesForReindexingUponSearchParameterChange(reindex);
			}
		};
	}

	private static void addAiastCode(FhirContext fhirContext, PrePopulatedValidationSupport extra) {
		if (extra.fetchCodeSystem(OBSERVATION_VALUE) != null) {
			return; // a definitions file already supplies it
		}
		CodeSystem bundled = (CodeSystem) fhirContext.getValidationSupport().fetchCodeSystem(OBSERVATION_VALUE);
		if (bundled == null) {
			throw new IllegalStateException("HAPI's bundled R4 terminology lacks " + OBSERVATION_VALUE);
		}
		CodeSystem withAiast = bundled.copy();
		ConceptDefinitionComponent aiast = new ConceptDefinitionComponent()
				.setCode("AIAST")
				.setDisplay("artificial intelligence asserted")
				.setDefinition("Security observation value: the information was asserted by an"
						+ " artificial intelligence system (added to HL7 terminology after R4).");
		ConceptDefinitionComponent parent = find(withAiast.getConcept(), "_SECINTPRVABOBV");
		(parent != null ? parent.getConcept() : withAiast.getConcept()).add(aiast);
		withAiast.setVersion(bundled.getVersion() + "-cxr-aiast");
		extra.addCodeSystem(withAiast);
		ourLog.info("Validation knows {}#AIAST", OBSERVATION_VALUE);
	}

	private static ConceptDefinitionComponent find(List<ConceptDefinitionComponent> concepts, String code) {
		for (ConceptDefinitionComponent c : concepts) {
			if (code.equals(c.getCode())) {
				return c;
			}
			ConceptDefinitionComponent inner = find(c.getConcept(), code);
			if (inner != null) {
				return inner;
			}
		}
		return null;
	}

	private static void storeSearchParameters(
			FhirContext fhirContext, DaoRegistry daoRegistry, ISearchParamRegistry registry) {
		IFhirResourceDao<SearchParameter> dao = daoRegistry.getResourceDao(SearchParameter.class);
		Resource[] files;
		try {
			files = new PathMatchingResourcePatternResolver()
					.getResources("classpath*:cxr-fhir/search-parameters/*.json");
		} catch (IOException e) {
			throw new IllegalStateException("cannot list cxr-fhir/search-parameters", e);
		}
		boolean changed = false;
		for (Resource file : files) {
			SearchParameter wanted;
			try (Reader reader = new InputStreamReader(file.getInputStream(), StandardCharsets.UTF_8)) {
				wanted = fhirContext.newJsonParser().parseResource(SearchParameter.class, reader);
			} catch (IOException e) {
				throw new IllegalStateException("cannot read " + file.getFilename(), e);
			}
			SystemRequestDetails request = new SystemRequestDetails();
			try {
				SearchParameter current = dao.read(wanted.getIdElement().toUnqualifiedVersionless(), request);
				if (current.getExpression().equals(wanted.getExpression())
						&& current.getCode().equals(wanted.getCode())) {
					continue;
				}
			} catch (ResourceNotFoundException e) {
				// first start on this database
			}
			dao.update(wanted, request);
			changed = true;
			ourLog.info("Stored SearchParameter/{} ({}); resources stored before it need"
					+ " $reindex to be found by it", wanted.getIdPart(), wanted.getExpression());
		}
		if (changed) {
			registry.forceRefresh();
		}
	}
}
