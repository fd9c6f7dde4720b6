package org.cxrfhir.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.context.annotation.Import;

/**
 * The cxr-fhir FHIR server: an R4 HAPI JPA server with rest-hook subscriptions and offline
 * validation, trimmed to what cxr-fhir uses (no CR/CQL, MDM, IPS, websocket subscriptions,
 * Elasticsearch, OpenAPI or tester UI).
 */
@SpringBootApplication(
		exclude = {
			// HAPI runs its own Quartz scheduler; Boot's would be a second, idle one.
			QuartzAutoConfiguration.class,
		},
		excludeName = {
			// The Elasticsearch client is on the classpath through Hibernate Search; without
			// this exclusion Boot starts a client that sniffs for a cluster we do not have.
			"org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration",
			"org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration",
			"org.springframework.boot.autoconfigure.data.elasticsearch.ElasticsearchDataAutoConfiguration",
			"org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration",
			// HAPI migrates/creates its own schema (hbm2ddl); Flyway must not touch it.
			"org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration",
		})
@EnableConfigurationProperties(CxrProperties.class)
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	ThreadPoolFactoryConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class,
})
public class CxrHapiApplication {

	public static void main(String[] args) {
		SpringApplication.run(CxrHapiApplication.class, args);
	}
}
