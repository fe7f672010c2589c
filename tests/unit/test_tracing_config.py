"""The tracing settings (SUBSIDY_TRACING*, server/config.py): off by default, each bounded, a bad
value stopping start-up with a message naming its variable."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError


def test_tracing_is_off_by_default_and_reads_its_settings() -> None:
    """Nothing set: off, the local collector, every call sampled, a 2,048-span queue; each
    setting read from its variable."""
    default = Config.from_env({})
    assert (default.tracing, default.tracing_endpoint, default.tracing_sample_ratio, default.tracing_queue_size) == (
        "off",
        "http://127.0.0.1:4317",
        1.0,
        2048,
    )
    config = Config.from_env(
        {
            "SUBSIDY_TRACING": "otlp",
            "SUBSIDY_TRACING_ENDPOINT": "https://collector.internal:4317",
            "SUBSIDY_TRACING_SAMPLE_RATIO": "0.1",
            "SUBSIDY_TRACING_QUEUE_SIZE": "10000",
        }
    )
    assert (config.tracing, config.tracing_endpoint, config.tracing_sample_ratio, config.tracing_queue_size) == (
        "otlp",
        "https://collector.internal:4317",
        0.1,
        10_000,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SUBSIDY_TRACING", "jaeger"),
        ("SUBSIDY_TRACING", "ON"),
        ("SUBSIDY_TRACING_ENDPOINT", "127.0.0.1:4317"),
        ("SUBSIDY_TRACING_ENDPOINT", "grpc://127.0.0.1:4317"),
        ("SUBSIDY_TRACING_ENDPOINT", "http://127.0.0.1:4317/v1/traces"),
        ("SUBSIDY_TRACING_SAMPLE_RATIO", "0"),
        ("SUBSIDY_TRACING_SAMPLE_RATIO", "1.5"),
        ("SUBSIDY_TRACING_SAMPLE_RATIO", "half"),
        ("SUBSIDY_TRACING_QUEUE_SIZE", "0"),
        ("SUBSIDY_TRACING_QUEUE_SIZE", "1000001"),
    ],
)
def test_a_bad_tracing_setting_names_its_variable(variable: str, value: str) -> None:
    """Each bad value is refused at start-up, naming the variable it came from."""
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({variable: value})
