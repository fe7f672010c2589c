"""SUBSIDY_REDIS_CLIENT (server/config.py): the money path's script client, lean by default,
redis-py on request; anything else stops start-up naming the variable."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError


def test_lean_by_default_and_redis_py_on_request() -> None:
    assert Config.from_env({}).redis_client == "lean"
    assert Config.from_env({"SUBSIDY_REDIS_CLIENT": "lean"}).redis_client == "lean"
    assert Config.from_env({"SUBSIDY_REDIS_CLIENT": "redis-py"}).redis_client == "redis-py"


@pytest.mark.parametrize("value", ["", "LEAN", "redis_py", "hiredis", "lean "])
def test_other_clients_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="SUBSIDY_REDIS_CLIENT"):
        Config.from_env({"SUBSIDY_REDIS_CLIENT": value})
