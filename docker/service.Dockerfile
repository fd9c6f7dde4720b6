FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md cxr_errors.py ./
COPY fhir_service fhir_service
COPY models models
COPY subscriptions subscriptions
COPY vector_store vector_store
RUN pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1
EXPOSE 10001
