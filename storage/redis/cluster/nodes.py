"""Plain connections to a Redis Cluster's nodes, found through the cluster client's slot map
(issue 16). Shared by the escrow budget and the shard stream reader.

Why not the cluster client's own commands: a ``WAIT`` vouches only for the writes made *on its
own connection*, so a script or a read that must be followed by a ``WAIT`` goes to the slot's
primary on one plain connection, pipelined (the cluster client's pipeline may re-send commands
one by one after a redirect, on other connections, where a ``WAIT`` would vouch for nothing).
"""

from __future__ import annotations

import asyncio

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

PING_TIMEOUT_S = 0.5


class NodeConnections:
    """One plain client per node address, made on first use, dropped when the node dies."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._clients: dict[tuple[str, int], redis.asyncio.Redis] = {}

    def address_of(self, key: str) -> tuple[str, int]:
        """The address of the primary serving ``key``'s slot in the client's current map (call
        :meth:`load_map` first)."""
        node = self.cluster.get_node_from_key(key)
        if node is None:
            raise RedisConnectionError(f"no node serves the slot of {key}")
        return node.host, int(node.port)

    async def load_map(self) -> None:
        """Load the slot map once (a no-op when it is loaded)."""
        await self.cluster.initialize()

    async def refresh_map(self) -> None:
        """Reload the slot map from the nodes (after MOVED, a failover, a dead connection)."""
        await self.cluster.nodes_manager.initialize()

    async def for_key(self, key: str) -> redis.asyncio.Redis:
        await self.load_map()
        return self.at(*self.address_of(key))

    def at(self, host: str, port: int) -> redis.asyncio.Redis:
        client = self._clients.get((host, port))
        if client is None:
            # No retries of its own: the callers retry with the slot map refreshed, and a dead
            # node must not cost seconds of backoff first.
            client = redis.asyncio.Redis(
                host=host, port=port, socket_timeout=5.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
            )
            self._clients[(host, port)] = client
        return client

    async def drop_dead(self) -> None:
        """Forget the clients of nodes that do not answer a PING."""
        for address, client in list(self._clients.items()):
            try:
                await asyncio.wait_for(client.ping(), PING_TIMEOUT_S)
            except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
                self._clients.pop(address, None)
                await client.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def cluster_client(
    startup: list[tuple[str, int]], *, timeout_s: float = 5.0, client_name: str | None = None
) -> RedisCluster:
    """redis-py's cluster client on some of the cluster's nodes (SUBSIDY_REDIS_CLUSTER_NODES): it
    learns the rest and the slot map from them."""
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in startup],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        client_name=client_name,
    )
