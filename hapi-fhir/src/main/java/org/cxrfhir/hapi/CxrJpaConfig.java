package org.cxrfhir.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import jakarta.persistence.EntityManagerFactory;
import org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy;
import org.hibernate.cfg.AvailableSettings;
import org.hibernate.dialect.Dialect;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.jdbc.DataSourceProperties;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.boot.orm.jpa.hibernate.SpringImplicitNamingStrategy;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.util.Map;
import javax.sql.DataSource;

/** The beans HAPI's JPA configuration expects the application to supply. */
@Configuration
@EnableTransactionManagement
public class CxrJpaConfig {

	private static final Logger ourLog = LoggerFactory.getLogger(CxrJpaConfig.class);

	@Bean
	public JpaStorageSettings jpaStorageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// Results carry references to DICOM/PACS URLs and to the Python service.
		settings.setAllowExternalReferences(true);
		// The worker re-reads a study right after the rest-hook fires; a cached search from a
		// minute ago would hide the newest results.
		settings.setReuseCachedSearchResultsForMillis(null);
		return settings;
	}

	@Bean
	public SubscriptionSettings subscriptionSettings(CxrProperties props) {
		SubscriptionSettings settings = new SubscriptionSettings();
		// Without a supported channel type HAPI never registers its matcher and every
		// Subscription stays "requested".
		settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		// Changes are persisted and handed to the matcher by a scheduled job (HAPI >= 6.10);
		// its period is the floor on delivery latency.
		settings.setSubscriptionIntervalInMs(props.getSubscriptionIntervalMs());
		// Subscription resources themselves skip that queue, so a new Subscription turns
		// "active" in well under a second instead of waiting for the next poll.
		settings.setSubscriptionChangeQueuedImmediately(true);
		ourLog.info("REST-hook subscriptions enabled; matching interval {} ms", props.getSubscriptionIntervalMs());
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/**
	 * HAPI's subscription delivery factory requires an email sender even when only rest-hook
	 * channels are enabled; this one is never called.
	 */
	@Bean
	public IEmailSender emailSender() {
		return details -> ourLog.warn("email subscriptions are not supported; dropped a notification");
	}

	/**
	 * Keeps large Binary payloads (PNG images) in their own table instead of inside the
	 * resource's JSON, so searches and history do not drag them along.
	 */
	@Bean
	public DatabaseBinaryContentStorageSvcImpl binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	@Bean
	public Dialect hapiDialect(CxrProperties props, DataSourceProperties dataSource) {
		String dialectClass = props.getDialect();
		if (dialectClass == null || dialectClass.isBlank()) {
			dialectClass = dialectFor(dataSource.determineUrl());
		}
		ourLog.info("Database {} with dialect {}", redact(dataSource.determineUrl()), dialectClass);
		try {
			return (Dialect) Class.forName(dialectClass).getDeclaredConstructor().newInstance();
		} catch (ReflectiveOperationException e) {
			throw new IllegalStateException("cannot load Hibernate dialect " + dialectClass, e);
		}
	}

	static String dialectFor(String jdbcUrl) {
		String url = jdbcUrl == null ? "" : jdbcUrl.toLowerCase();
		if (url.startsWith("jdbc:postgresql:")) {
			return HapiFhirPostgresDialect.class.getName();
		}
		if (url.startsWith("jdbc:h2:")) {
			return HapiFhirH2Dialect.class.getName();
		}
		throw new IllegalStateException("unsupported JDBC URL " + redact(jdbcUrl)
				+ "; use jdbc:h2:... or jdbc:postgresql:..., or set cxr.dialect");
	}

	private static String redact(String jdbcUrl) {
		return jdbcUrl == null ? "" : jdbcUrl.replaceAll("(?i)(password=)[^&;]*", "$1***");
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			JpaProperties jpaProperties,
			DataSource dataSource,
			Dialect hapiDialect) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		Map<String, String> props = jpaProperties.getProperties();
		props.put(AvailableSettings.DIALECT, hapiDialect.getClass().getName());
		// HAPI lists its entities explicitly; scanning the 300 MB classpath only costs start-up time.
		props.putIfAbsent(AvailableSettings.SCANNER, "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		props.putIfAbsent(AvailableSettings.IMPLICIT_NAMING_STRATEGY, SpringImplicitNamingStrategy.class.getName());
		props.putIfAbsent(
				AvailableSettings.PHYSICAL_NAMING_STRATEGY, CamelCaseToUnderscoresNamingStrategy.class.getName());
		props.putIfAbsent(AvailableSettings.HBM2DDL_AUTO, "update");
		props.putIfAbsent(AvailableSettings.STATEMENT_BATCH_SIZE, "20");
		props.putIfAbsent(AvailableSettings.USE_QUERY_CACHE, "false");
		props.putIfAbsent(AvailableSettings.USE_SECOND_LEVEL_CACHE, "false");
		// No fulltext/Lucene index: we search by token, reference and date only.
		props.putIfAbsent("hibernate.search.enabled", "false");
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setJpaPropertyMap(props);
		factory.setDataSource(dataSource);
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager manager = new JpaTransactionManager();
		manager.setEntityManagerFactory(entityManagerFactory);
		return manager;
	}

	/** HAPI asks this for the dialect to pick database-specific SQL (e.g. for search). */
	@Primary
	@Bean
	public HibernatePropertiesProvider hibernatePropertiesProvider(Dialect hapiDialect) {
		return new HibernatePropertiesProvider() {
			@Override
			public Dialect getDialect() {
				return hapiDialect;
			}
		};
	}
}
