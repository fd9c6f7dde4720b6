# cxr-fhir — every set-up step lives here, so `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CXR := $(VENV)/bin/cxr
JAR := hapi-fhir/target/cxr-hapi-fhir.jar
HAPI_SOURCES := hapi-fhir/pom.xml $(shell find hapi-fhir/src -type f 2>/dev/null)
# No model hub is reachable here: fail fast instead of retrying for ~46 s.
export HF_HUB_OFFLINE ?= 1

.PHONY: help install jar browser pacs demo stop test test-unit test-integration lint format bench clean

help:
	@echo "make demo   - set up, start HAPI + PostgreSQL + service + worker, run the demo"
	@echo "make test   - set up and run the whole test suite against the real servers"
	@echo "make lint   - ruff + mypy + import contracts (lint-imports)"
	@echo "make stop   - stop everything the demo started"
	@echo "make bench  - run the benchmarks in bench/"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(JAR): $(HAPI_SOURCES)
	mvn -q -B -f hapi-fhir/pom.xml -DskipTests package
	touch $@

jar: $(JAR)

demo: install jar pacs
	$(CXR) demo

stop: install
	-$(CXR) demo stop

# Debian's Chromium for the browser test (Playwright never downloads its own browser).
browser: /usr/bin/chromium

/usr/bin/chromium:
	apt-get update && apt-get install -y chromium

test: install jar browser pacs
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not integration"

test-integration: install jar pacs
	$(PY) -m pytest -m integration

# Debian's Orthanc and its DICOMweb plugin: the embedded PACS (`cxr pacs start`).
pacs: /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so

/usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so:
	apt-get update && apt-get install -y --no-install-recommends orthanc orthanc-dicomweb

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install jar
	for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	-$(CXR) demo stop
	rm -rf .cxr-data hapi-fhir/target
