"""SUBSIDY_REDIS_CLUSTER_NODES (issue 16): empty by default (one Redis, today's behaviour),
else 1 to 32 host:port pairs; anything else refused naming the variable."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError, cluster_nodes


def test_empty_by_default_means_one_redis() -> None:
    assert Config().redis_cluster_nodes == ""
    assert cluster_nodes("") == []


def test_one_and_the_maximum_of_32_nodes() -> None:
    assert cluster_nodes("127.0.0.1:7000") == [("127.0.0.1", 7000)]
    many = ",".join(f"redis-{index}.internal:{6379 + index}" for index in range(32))
    assert len(Config.from_env({"SUBSIDY_REDIS_CLUSTER_NODES": many}).redis_cluster_nodes.split(",")) == 32
    with pytest.raises(ConfigError, match="at most 32"):
        cluster_nodes(many + ",one-more:1")


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", ":7000", "h:0", "h:65536", "h:-1", "h:7000,", "h x:1"])
def test_bad_lists_are_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="SUBSIDY_REDIS_CLUSTER_NODES"):
        Config.from_env({"SUBSIDY_REDIS_CLUSTER_NODES": text})


def test_ports_one_and_65535_are_accepted() -> None:
    assert cluster_nodes("a:1, b:65535") == [("a", 1), ("b", 65535)]
