# The gateway image. Not built in CI (no Docker engine there); see README "Docker".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SUBSIDY_LISTEN=0.0.0.0:50051 SUBSIDY_WORKERS=2

WORKDIR /app
COPY clients/python /app/clients/python
COPY pyproject.toml /app/
COPY server /app/server
COPY storage /app/storage
COPY benchmarks /app/benchmarks
COPY examples /app/examples
RUN pip install --no-cache-dir ./clients/python . \
    && useradd --system --uid 10001 gateway
USER gateway

EXPOSE 50051
# Configuration comes from SUBSIDY_* variables (README, "Configuration").
CMD ["python", "-m", "server"]
