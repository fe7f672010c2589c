# One entry point per task. Every target creates the virtualenv first, so a fresh clone needs
# nothing but python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: reset run test test-fast lint format gen-protos check-protos bench demo clean venv
.PHONY: certs run-tls run-mtls demo-tls demo-mtls

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e clients/python -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## Run the server: embedded PostgreSQL and Redis when none is configured, demo data loaded.
run: $(STAMP)
	$(PY) -m server.dev

## Forget make run's data (database subsidy_dev, Redis prefix sg); the next make run starts afresh.
reset: $(STAMP)
	$(PY) -m server.dev --reset

## The whole test suite against real Redis and PostgreSQL (found or started the same way).
test: $(STAMP)
	$(PY) -m pytest

## Unit and integration tests without the multi-process load and fault tests.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy server storage clients/python/subsidy_client benchmarks

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

gen-protos: $(STAMP)
	$(PY) scripts/gen_protos.py

## Fails when the checked-in generated code differs from what the protos produce.
check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

## A short client session against a running server (make run in another terminal).
demo: $(STAMP)
	$(PY) -m subsidy_client.demo

## Development certificates (README "Security"): a local CA, the server's for 127.0.0.1 and
## localhost, one client certificate per caller of examples/demo.yaml, in .certs/.
certs: $(STAMP)
	$(VENV)/bin/subsidyctl dev-certs --out .certs

TLS_ENV := SUBSIDY_TLS_CERT=.certs/server.pem SUBSIDY_TLS_KEY=.certs/server.key

## make run and make demo over TLS, or mutual TLS, with the certificates of make certs.
run-tls: $(STAMP)
	$(TLS_ENV) $(PY) -m server.dev

run-mtls: $(STAMP)
	$(TLS_ENV) SUBSIDY_TLS_CLIENT_CA=.certs/ca.pem $(PY) -m server.dev

demo-tls: $(STAMP)
	$(PY) -m subsidy_client.demo --certs .certs

demo-mtls: $(STAMP)
	$(PY) -m subsidy_client.demo --certs .certs --mtls

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .data .keys .pytest_cache .mypy_cache .ruff_cache
