# One entry point per task. Every target creates the virtualenv first, so a fresh clone needs
# nothing but python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: reset run test test-fast test-cluster fuzz lint format gen-protos check-protos bench bench-recon bench-report demo clean venv
.PHONY: certs run-tls run-mtls demo-tls demo-mtls
.PHONY: lock check-lock buf

# The virtualenv holds exactly what requirements-dev.lock pins (hashes checked), then the two
# local packages without resolving anything more; pip check fails on a lock that does not
# satisfy them.
$(STAMP): pyproject.toml clients/python/pyproject.toml requirements-dev.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e clients/python -e .
	$(PY) -m pip check
	@touch $(STAMP)

venv: $(STAMP)

## Rewrite requirements.lock (the server's image) and requirements-dev.lock (make's virtualenv)
## from pyproject.toml and clients/python/pyproject.toml: every package pinned, with hashes, for
## Python 3.11+ on any platform. Versions already locked are kept unless the inputs need others;
## `make lock UPGRADE=--upgrade` (or UPGRADE='--upgrade-package NAME') moves them on.
LOCK_DIR ?=
LOCK_FLAGS = --quiet --universal --python-version 3.11 --generate-hashes \
	--no-emit-package subsidy-client --no-emit-package subsidy-gateway \
	--custom-compile-command 'make lock' $(UPGRADE)
# Order-only: the pins just edited are not in the lock yet, so the virtualenv must not be
# reinstalled (and pip-checked) from the old lock first; it only has to exist.
lock: | $(STAMP)
	printf '%s\n' '-e ./clients/python' '-e .[dev]' \
	  | $(VENV)/bin/uv pip compile $(LOCK_FLAGS) -o $(LOCK_DIR)requirements-dev.lock -
	printf '%s\n' '-e ./clients/python' '-e .' \
	  | $(VENV)/bin/uv pip compile $(LOCK_FLAGS) -c $(LOCK_DIR)requirements-dev.lock -o $(LOCK_DIR)requirements.lock -

## Fails when the lock files no longer pin what the pyproject files ask for (run make lock).
## Compares package versions, not hashes (an index may add a wheel to a release later).
check-lock: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp requirements.lock requirements-dev.lock "$$tmp/" && \
	$(MAKE) --no-print-directory lock LOCK_DIR="$$tmp/" >/dev/null && \
	for lock in requirements.lock requirements-dev.lock; do \
	  grep -E '^[A-Za-z0-9]' $$lock | sed 's/ *\\$$//' > "$$tmp/$$lock.committed"; \
	  grep -E '^[A-Za-z0-9]' "$$tmp/$$lock" | sed 's/ *\\$$//' > "$$tmp/$$lock.fresh"; \
	  diff -u "$$tmp/$$lock.committed" "$$tmp/$$lock.fresh" \
	    || { echo "$$lock is out of date with the pyproject files: run make lock" >&2; exit 1; }; \
	done

## buf lint and buf breaking on protos/ (tools/buf-check; buf from the npm package in tools/).
tools/node_modules/.bin/buf: tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

buf: tools/node_modules/.bin/buf
	tools/buf-check

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

## Only the Redis Cluster tests (issue 16): a local 6-node cluster, the escrow budget shards
## under load, a killed primary and a moving slot, the shard streams drained into PostgreSQL,
## the unchanged sale scripts in consumer shards
## (part of make test too; 70-130 s here, with the machine's load).
test-cluster: $(STAMP)
	$(PY) -m pytest tests/integration/test_cluster_*.py

## Property-based fuzzing of the public RPCs (tests/fuzz/run.py): at least 100,000 calls through a
## real gateway; prints the case count, the seed and the time. SUBSIDY_FUZZ_CASES / _SEED override.
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.run

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

TLS_ENV := SUBSIDY_TLS_CERT=.certs/server.pem SUBSIDY_TLS_KEY=.certs/server.key SUBSIDY_DASHBOARD_GATEWAY_CA=.certs/ca.pem

## make run and make demo over TLS, or mutual TLS, with the certificates of make certs.
run-tls: $(STAMP)
	$(TLS_ENV) $(PY) -m server.dev

run-mtls: $(STAMP)
	$(TLS_ENV) SUBSIDY_TLS_CLIENT_CA=.certs/ca.pem $(PY) -m server.dev

demo-tls: $(STAMP)
	$(PY) -m subsidy_client.demo --certs .certs

demo-mtls: $(STAMP)
	$(PY) -m subsidy_client.demo --certs .certs --mtls

## BENCH_ARGS: the suite's options, e.g. BENCH_ARGS=--quick (benchmarks/README.md).
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

## Bill reconciliation of a generated day: a settlement file of about 1,000,000 lines imported and
## matched against the ledger (benchmarks/reconciliation.py); RECON_ARGS, e.g. RECON_ARGS='--lines 100000'.
bench-recon: $(STAMP)
	$(PY) -m benchmarks.reconciliation $(RECON_ARGS)

## The T+1 report of a generated day: about 1,000,000 ledger events across 2,000 merchants cut,
## published and exported (benchmarks/daily_report.py); REPORT_ARGS, e.g. REPORT_ARGS='--events 100000'.
bench-report: $(STAMP)
	$(PY) -m benchmarks.daily_report $(REPORT_ARGS)

clean:
	rm -rf $(VENV) .data .keys .pytest_cache .mypy_cache .ruff_cache
