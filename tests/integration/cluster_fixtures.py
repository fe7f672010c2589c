"""The local Redis Cluster as a pytest fixture (issue 16). Not a conftest: a test module that
needs the cluster imports the fixture by name, so no other test starts six redis-servers.

    from tests.integration import cluster_fixtures
    redis_cluster = cluster_fixtures.redis_cluster
    cluster_client = cluster_fixtures.cluster_client  # a redis-py cluster client on it, per test
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from storage.cluster_dev import ClusterNode as LocalNode
from storage.cluster_dev import LocalCluster, command


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


def lose_the_replication_link(cluster: LocalCluster, key: str) -> tuple[LocalNode, LocalNode]:
    """Freeze the replica of ``key``'s primary and cut its link on the primary: what the primary
    writes next reaches no replica (what a slow or partitioned replica makes of asynchronous
    replication). Returns (primary, replica)."""
    primary = cluster.primary_of_slot(cluster.slot_of(key))
    (replica,) = cluster.replicas_of(primary)
    cluster.freeze(replica)
    command(primary.client(), "CLIENT", "KILL", "TYPE", "replica")
    return primary, replica


async def fail_over(cluster: LocalCluster, key: str, primary: LocalNode, replica: LocalNode) -> None:
    """Kill the primary, let the frozen replica go on (promoted without what it missed), and
    restart the old primary, which rejoins as the new one's replica."""
    cluster.kill(primary)
    cluster.thaw(replica)
    await asyncio.to_thread(cluster.wait_promoted, primary, cluster.slot_of(key))
    cluster.restart(primary)
    await asyncio.to_thread(cluster.wait_ok)
