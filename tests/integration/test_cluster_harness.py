"""The local Redis Cluster harness itself (storage/cluster_dev.py): six real redis-servers,
three primaries with one replica each, every slot served; a killed primary's replica takes
over with what WAIT acknowledged; a slot moves with its keys, clients following MOVED/ASK."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from redis.cluster import ClusterNode as Startup
from redis.cluster import RedisCluster

from storage import cluster_dev
from storage.cluster_dev import SLOTS, LocalCluster
from tests.integration import cluster_fixtures

redis_cluster = cluster_fixtures.redis_cluster  # the module's fixture


def _client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[Startup(h, p) for h, p in cluster.startup_nodes], decode_responses=True)


def test_six_nodes_three_primaries_each_with_a_replica(redis_cluster: LocalCluster) -> None:
    view = redis_cluster.nodes_view()
    assert len(view) == 6
    primaries = [e for e in view if "master" in e["flags"]]
    replicas = [e for e in view if "slave" in e["flags"]]
    assert len(primaries) == 3 and len(replicas) == 3
    assert sorted(r["master"] for r in replicas) == sorted(p["id"] for p in primaries)
    served = 0
    for primary in primaries:
        for part in primary["slots"].split():
            low, _, high = part.partition("-")
            served += int(high or low) - int(low) + 1
    assert served == SLOTS
    for node in redis_cluster.nodes:
        config = node.client().config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "always"
        assert str(node.directory).startswith(str(redis_cluster._root))


def test_slot_moves_with_its_keys(redis_cluster: LocalCluster) -> None:
    client = _client(redis_cluster)
    try:
        key = "{harness-move}:k"
        client.set(key, "v")
        slot = redis_cluster.slot_of(key)
        source = redis_cluster.primary_of_slot(slot)
        target = next(n for n in redis_cluster.primaries_now() if n is not source)
        redis_cluster.begin_slot_move(slot, target)
        assert redis_cluster.migrate_keys(slot, source, target) == 1
        assert client.get(key) == "v"  # migrating: the source answers ASK, the client follows
        redis_cluster.finish_slot_move(slot, source, target)
        assert redis_cluster.primary_of_slot(slot) is target
        assert client.get(key) == "v"  # MOVED, then the new owner
        assert target.client().execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        assert source.client().execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    finally:
        client.close()


@pytest.mark.slow
def test_killed_primary_replica_promoted_with_what_wait_acknowledged(redis_cluster: LocalCluster) -> None:
    client = _client(redis_cluster)
    try:
        key = "{harness-kill}:k"
        slot = redis_cluster.slot_of(key)
        primary = redis_cluster.primary_of_slot(slot)
        for value in range(200):
            primary.client().set(key, value)
            assert primary.client().execute_command("WAIT", 1, 5000) == 1
        victim = redis_cluster.kill_primary(slot)
        assert victim is primary and not victim.alive
        successor = redis_cluster.primary_of_slot(slot)
        assert successor is not victim
        assert successor.client().get(key) == "199"
        redis_cluster.restart(victim)
        redis_cluster.wait_ok()  # rejoined as its successor's replica, link up
        entry = next(e for e in redis_cluster.nodes_view() if e["address"] == victim.address)
        assert "slave" in entry["flags"] and entry["master"] == successor.node_id
    finally:
        client.close()


def test_stop_kills_every_node_and_removes_the_directory(tmp_path: Path) -> None:
    cluster = LocalCluster(base_dir=tmp_path)
    cluster.start()
    processes = [node.process for node in cluster.nodes]
    root = cluster._root
    assert root is not None and root.exists()
    with pytest.raises(RuntimeError):  # a failing test body: the cluster still goes away
        try:
            raise RuntimeError("test failed")
        finally:
            cluster.stop()
    assert all(p is not None and p.poll() is not None for p in processes)
    assert not root.exists()


def test_a_standalone_redis_beside_the_cluster_for_benchmarks(redis_cluster: LocalCluster) -> None:
    """start_standalone: one more redis-server of the same binary and AOF settings, not in
    cluster mode (a script there may touch any key), in the cluster's directory, not a member."""
    node = redis_cluster.start_standalone()
    try:
        client = node.client()
        assert "cluster_enabled:0" in node.command_text("INFO", "cluster")
        config = client.config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "always"
        assert client.mset({"{a}x": 1, "{b}y": 2})  # two slots in one command: no CROSSSLOT
        assert str(node.directory).startswith(str(redis_cluster._root))
        assert node.address not in {entry["address"] for entry in redis_cluster.nodes_view()}
    finally:
        redis_cluster.kill(node)
    assert not node.alive


def test_ports_and_bus_ports_stay_out_of_the_ephemeral_range() -> None:
    low, high = cluster_dev._ephemeral_range()
    ports = cluster_dev._free_ports(6)
    assert len(set(ports)) == 6
    for port in ports:
        assert not low <= port <= high and not low <= port + cluster_dev.BUS_PORT_OFFSET <= high


def test_a_bus_port_taken_after_the_choice_starts_the_nodes_again_on_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI failure of 2026-12-01: a node's bus port (port + 10000), free when chosen, was
    taken before redis-server bound it, and the node exited "Address already in use". The
    first choice here has its bus port bound by this test in between; the start retries."""
    choose = cluster_dev._free_ports
    held: list[socket.socket] = []
    chosen: list[list[int]] = []

    def choose_then_take_one(count: int) -> list[int]:
        ports = choose(count)
        chosen.append(ports)
        if len(chosen) == 1:
            squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatter.bind(("127.0.0.1", ports[-1] + cluster_dev.BUS_PORT_OFFSET))
            squatter.listen()
            held.append(squatter)
        return ports

    monkeypatch.setattr(cluster_dev, "_free_ports", choose_then_take_one)
    cluster = LocalCluster(base_dir=tmp_path)
    try:
        cluster.start()
        assert len(chosen) == 2
        assert [node.port for node in cluster.nodes] == chosen[1]
        assert all(node.alive for node in cluster.nodes)
        assert len(cluster.nodes_view()) == 6
    finally:
        cluster.stop()
        for squatter in held:
            squatter.close()
