# The server's image: the gateway (the default command) and the ledger writer
# (`python -m server.ledger writer`), which docker-compose.yml runs from the same image.
# Not built in CI (no Docker engine there); CI does make the same install from
# requirements.lock in a scratch virtualenv and imports every module (README "Docker").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SUBSIDY_LISTEN=0.0.0.0:50051 SUBSIDY_WORKERS=2

WORKDIR /app
# The runtime dependencies alone, every one pinned and hash-checked: no embedded PostgreSQL
# or Redis, no development tools (those are in requirements-dev.lock). A layer of its own, so
# a code change does not reinstall them.
COPY requirements.lock /app/
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY clients/python /app/clients/python
COPY pyproject.toml /app/
COPY server /app/server
COPY storage /app/storage
COPY examples /app/examples
# The two local packages, without resolving anything beyond the lock.
RUN pip install --no-cache-dir --no-deps ./clients/python . \
    && pip check \
    && useradd --system --uid 10001 gateway
USER gateway

# 50051: gRPC; 9464: the ledger writer's /metrics and /health (SUBSIDY_WRITER_METRICS_LISTEN).
EXPOSE 50051 9464
# Configuration comes from SUBSIDY_* variables (README, "Configuration").
CMD ["python", "-m", "server"]
