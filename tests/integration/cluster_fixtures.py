"""The local Redis Cluster as a pytest fixture (issue 16). Not a conftest: a test module that
needs the cluster imports the fixture by name, so no other test starts six redis-servers.

    from tests.integration import cluster_fixtures
    redis_cluster = cluster_fixtures.redis_cluster
    cluster_client = cluster_fixtures.cluster_client  # a redis-py cluster client on it, per test
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from storage.cluster_dev import LocalCluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Six nodes (3 primaries, 1 replica each), started for the module and killed, with their
    directories removed, whatever the tests did (the finally runs on failure too)."""
    cluster = LocalCluster(base_dir=tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_client(redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """redis-py's cluster client on the module's cluster, closed after the test."""
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.startup_nodes])
    try:
        yield client
    finally:
        await client.aclose()
