package org.cxrfhir.hapi;

import ca.uhn.fhir.rest.annotation.IdParam;
import ca.uhn.fhir.rest.annotation.Operation;
import ca.uhn.fhir.rest.server.servlet.ServletRequestDetails;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import org.hl7.fhir.r4.model.IdType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.stereotype.Component;

import java.io.IOException;
import java.io.OutputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;

/**
 * {@code ImagingStudy/$similar} at HAPI's own base URL: EHR clients know one FHIR endpoint, so
 * the operation is answered here by forwarding to the cxr-fhir service (which owns the vector
 * index) and returning its Bundle or OperationOutcome unchanged. If the service is down the
 * client gets a 503 OperationOutcome at once, not a hang.
 *
 * <p>The caller's {@code Authorization} header goes with the request: the service decides who
 * may search and what they see (a patient's token sees that patient's studies), so through
 * HAPI's base {@code $similar} is exactly as open as at the service, and the service's
 * {@code WWW-Authenticate} answer comes back. A POST body (a Parameters resource with an image)
 * is read from HAPI's own copy of the request: the request validator has already consumed the
 * servlet's input stream, which is why forwarded POSTs used to arrive empty.
 */
@Component
public class SimilarForwardingProvider implements PlainProvider {

	private static final Logger ourLog = LoggerFactory.getLogger(SimilarForwardingProvider.class);
	private static final String FHIR_JSON = "application/fhir+json";

	private final CxrProperties props;
	// HTTP/1.1: Java's client otherwise asks a plain-http server to upgrade to h2c, which the
	// service (uvicorn) does not speak; POSTs with a body then arrived mangled or not at all.
	private final HttpClient http = HttpClient.newBuilder()
			.version(HttpClient.Version.HTTP_1_1)
			.connectTimeout(Duration.ofSeconds(3))
			.build();

	public SimilarForwardingProvider(CxrProperties props) {
		this.props = props;
	}

	@Operation(name = "$similar", typeName = "ImagingStudy", idempotent = true, manualRequest = true,
			manualResponse = true)
	public void similarByTextOrImage(ServletRequestDetails details, HttpServletRequest request,
			HttpServletResponse response) throws IOException {
		forward("ImagingStudy/$similar", details, request, response);
	}

	@Operation(name = "$similar", typeName = "ImagingStudy", idempotent = true, manualRequest = true,
			manualResponse = true)
	public void similarToStudy(@IdParam IdType id, ServletRequestDetails details,
			HttpServletRequest request, HttpServletResponse response) throws IOException {
		forward("ImagingStudy/" + id.getIdPart() + "/$similar", details, request, response);
	}

	private void forward(String path, ServletRequestDetails details, HttpServletRequest request,
			HttpServletResponse response) throws IOException {
		String query = request.getQueryString();
		URI target = URI.create(props.getSimilarServiceUrl().replaceAll("/+$", "") + "/fhir/" + path
				+ (query == null ? "" : "?" + query));
		HttpRequest.Builder out = HttpRequest.newBuilder(target)
				.timeout(Duration.ofSeconds(props.getSimilarTimeoutSeconds()))
				.header("Accept", FHIR_JSON);
		String authorization = request.getHeader("Authorization");
		if (authorization != null) {
			out.header("Authorization", authorization);
		}
		if ("POST".equalsIgnoreCase(request.getMethod())) {
			byte[] body = details.loadRequestContents();
			if (body == null) {
				body = new byte[0];
			}
			String type = request.getContentType() == null ? FHIR_JSON : request.getContentType();
			out.header("Content-Type", type).POST(HttpRequest.BodyPublishers.ofByteArray(body));
		} else {
			out.GET();
		}
		HttpResponse<byte[]> answer;
		try {
			answer = http.send(out.build(), HttpResponse.BodyHandlers.ofByteArray());
		} catch (IOException e) {
			ourLog.warn("$similar: service at {} unreachable: {}", props.getSimilarServiceUrl(), e.toString());
			unavailable(response, "the similar-case service at " + props.getSimilarServiceUrl()
					+ " is unavailable: " + e.getClass().getSimpleName());
			return;
		} catch (InterruptedException e) {
			Thread.currentThread().interrupt();
			unavailable(response, "interrupted while waiting for the similar-case service");
			return;
		}
		response.setStatus(answer.statusCode());
		response.setContentType(answer.headers().firstValue("content-type").orElse(FHIR_JSON));
		answer.headers().firstValue("www-authenticate")
				.ifPresent(challenge -> response.setHeader("WWW-Authenticate", challenge));
		try (OutputStream body = response.getOutputStream()) {
			body.write(answer.body());
		}
	}

	private static void unavailable(HttpServletResponse response, String text) throws IOException {
		response.setStatus(503);
		response.setContentType(FHIR_JSON);
		String json = "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"error\","
				+ "\"code\":\"transient\",\"diagnostics\":" + quote(text) + "}]}";
		try (OutputStream body = response.getOutputStream()) {
			body.write(json.getBytes(StandardCharsets.UTF_8));
		}
	}

	private static String quote(String s) {
		return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
	}
}
