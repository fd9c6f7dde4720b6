FROM maven:3.9-eclipse-temurin-17 AS build
WORKDIR /src
COPY hapi-fhir/pom.xml hapi-fhir/pom.xml
RUN mvn -q -B -f hapi-fhir/pom.xml dependency:go-offline
COPY hapi-fhir/src hapi-fhir/src
RUN mvn -q -B -f hapi-fhir/pom.xml -DskipTests package

FROM eclipse-temurin:17-jre
COPY --from=build /src/hapi-fhir/target/cxr-hapi-fhir.jar /app/cxr-hapi-fhir.jar
EXPOSE 8080
ENTRYPOINT ["java", "-jar", "/app/cxr-hapi-fhir.jar"]
