"""Real multi-process Redis topologies on 127.0.0.1 for tests: a Redis Cluster and a Sentinel set.

* :class:`LocalRedisCluster` - ``primaries`` primaries with ``replicas`` replicas each (3 + 3 by
  default), every node a ``redis-server --cluster-enabled yes`` child process on free ports, the
  slots split evenly, replicas attached and in sync before :meth:`~LocalRedisCluster.start` returns.
* :class:`LocalRedisSentinel` - a primary, a replica and three ``redis-server --sentinel``
  processes monitoring it (quorum 2), all discovered by each other before ``start`` returns.

Both are context managers, keep their files in a temporary folder, bind 127.0.0.1 only, never
persist, and let a test kill a node (SIGKILL, like a crashed machine) to exercise a failover with
short, test-friendly timeouts (``node_timeout_ms``/``down_after_ms``). They never touch a Redis
already running on the machine.

:class:`RedisDeployment` describes where a test's Redis is in any of the three modes and builds the
matching ``RedisConfig`` (``config()``) or settings environment (``env()``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from voxcore.adapters.redis.config import RedisConfig
from voxcore.entrypoints.embedded_redis import free_port, port_answers, stop_process

#: Redis Cluster's slot count.
SLOTS = 16384
_HOST = "127.0.0.1"


@dataclass(frozen=True)
class RedisDeployment:
    """A test's Redis in one of the three modes (``standalone``, ``cluster``, ``sentinel``).

    Attributes:
        url: A ``redis://`` URL of one data node (the server itself when standalone).
        kind: Where it came from (``redis-server``, ``container``, ``env``, ``cluster``, ``sentinel``).
        mode: The ``redis.mode`` to use.
        nodes: Cluster startup nodes (``host:port``).
        sentinels: Sentinel addresses (``host:port``).
        service: The Sentinel service name.
        topology: The :class:`LocalRedisCluster`/:class:`LocalRedisSentinel` behind it, if any.
    """

    url: str = field(repr=False)  # may hold a password
    kind: str
    mode: str = "standalone"
    nodes: tuple[str, ...] = ()
    sentinels: tuple[str, ...] = ()
    service: str = ""
    topology: Any = field(default=None, compare=False, repr=False)

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``RedisConfig`` for this deployment (``overrides``: any other RedisConfig field)."""
        if self.mode == "cluster":
            return RedisConfig(mode="cluster", nodes=self.nodes, **overrides)
        if self.mode == "sentinel":
            return RedisConfig(
                mode="sentinel", sentinels=self.sentinels, sentinel_service=self.service, **overrides
            )
        return RedisConfig(url=self.url, **overrides)

    def env(self) -> dict[str, str]:
        """Environment variables that point ``load_settings`` at this deployment."""
        variables = {"REDIS_URL": self.url, "VOXCORE_REDIS__MODE": self.mode}
        if self.mode == "cluster":
            variables["VOXCORE_REDIS__NODES"] = ",".join(self.nodes)
        if self.mode == "sentinel":
            variables["VOXCORE_REDIS__SENTINELS"] = ",".join(self.sentinels)
            variables["VOXCORE_REDIS__SENTINEL_SERVICE"] = self.service
        return variables

    @classmethod
    def of_cluster(cls, cluster: LocalRedisCluster) -> RedisDeployment:
        """The deployment of a started :class:`LocalRedisCluster`."""
        nodes = cluster.startup_nodes
        return cls(f"redis://{nodes[0]}/0", "cluster", "cluster", nodes=nodes, topology=cluster)

    @classmethod
    def of_sentinel(cls, topology: LocalRedisSentinel) -> RedisDeployment:
        """The deployment of a started :class:`LocalRedisSentinel`."""
        return cls(
            f"redis://{topology.primary_address()}/0",
            "sentinel",
            "sentinel",
            sentinels=topology.sentinel_addresses,
            service=topology.service,
            topology=topology,
        )


class TopologyError(RuntimeError):
    """A topology did not come up (or did not settle) in time; the message says which node and why."""


@dataclass
class RedisNode:
    """One ``redis-server`` child process (a data node or a Sentinel)."""

    port: int
    args: list[str]
    log_path: Path
    bus_port: int | None = None  # the cluster bus port of a cluster node
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Launch the process (returns at once; see :meth:`wait_answers`)."""
        if self.running:
            return
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def wait_answers(self, timeout: float) -> None:
        """Wait until the node answers PING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise TopologyError(f"redis-server on port {self.port} exited: {self._tail()}")
            if port_answers(_HOST, self.port):
                return
            time.sleep(0.02)
        raise TopologyError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown, no goodbye to the peers) and reap the process."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and reap the process."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous client of this node (for set-up and inspection)."""
        return redis.Redis(host=_HOST, port=self.port, socket_timeout=2, socket_connect_timeout=1, **options)

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"


def _binary(binary: str | None) -> str:
    found = binary or shutil.which("redis-server")
    if not found:
        raise TopologyError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return found


def _wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(interval)
    raise TopologyError(f"timed out after {timeout} s waiting for {what}")


def _start_all(nodes: Sequence[RedisNode], timeout: float) -> None:
    """Start every node, then wait until each answers (they boot in parallel)."""
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_answers(timeout)


def _base_args(binary: str, port: int, folder: Path, log: Path) -> list[str]:
    return [
        binary,
        "--bind", _HOST,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(folder),
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--loglevel", "notice",
        "--logfile", str(log),
    ]  # fmt: skip


class LocalRedisCluster:
    """A Redis Cluster of real ``redis-server`` processes on free 127.0.0.1 ports.

    Args:
        primaries: Primary count (>= 3: Redis Cluster needs a majority of primaries to fail a node over).
        replicas: Replicas per primary.
        node_timeout_ms: ``cluster-node-timeout``: how long a silent node takes to be marked failed
            (the failover starts then; production default is 15 000).
        binary: ``redis-server`` path; looked up on PATH when omitted.

    Example::

        with LocalRedisCluster() as cluster:
            config = RedisConfig(mode="cluster", nodes=cluster.startup_nodes)
    """

    def __init__(
        self, primaries: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000, binary: str | None = None
    ) -> None:
        if primaries < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries to fail over")
        if replicas < 0:
            raise ValueError("replicas must not be negative")
        self._binary = _binary(binary)
        self._primaries = primaries
        self._replicas = replicas
        self._node_timeout_ms = node_timeout_ms
        self._dir = tempfile.TemporaryDirectory(prefix="voxcore-cluster-")
        self.nodes: list[RedisNode] = []

    @property
    def startup_nodes(self) -> tuple[str, ...]:
        """``host:port`` of every node that is running (for ``RedisConfig(nodes=...)``)."""
        return tuple(node.address for node in self.nodes if node.running)

    def start(self, timeout: float = 30.0) -> Self:
        """Start the nodes, assign the slots, attach the replicas, wait for ``cluster_state:ok``."""
        if self.nodes:
            return self
        folder = Path(self._dir.name)
        try:
            for index in range(self._primaries * (1 + self._replicas)):
                port, bus_port = free_port(), free_port()
                node_dir = folder / f"node-{index}"
                node_dir.mkdir()
                log = node_dir / "redis.log"
                args = _base_args(self._binary, port, node_dir, log) + [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", str(self._node_timeout_ms),
                    "--cluster-port", str(bus_port),
                    # A replica may always take over, however long it was cut off (tests kill and
                    # restart nodes in quick succession).
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "yes",
                ]  # fmt: skip
                self.nodes.append(RedisNode(port, args, log, bus_port))
            _start_all(self.nodes, timeout)
            self._form(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _form(self, timeout: float) -> None:
        primaries, replicas = self.nodes[: self._primaries], self.nodes[self._primaries :]
        clients = {node.port: node.client() for node in self.nodes}
        try:
            per = SLOTS // len(primaries)
            for index, node in enumerate(primaries):
                first = index * per
                last = SLOTS - 1 if index == len(primaries) - 1 else first + per - 1
                _command(clients[node.port], "CLUSTER", "ADDSLOTSRANGE", first, last)
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                _command(clients[node.port], "CLUSTER", "MEET", _HOST, seed.port, seed.bus_port)
            total = len(self.nodes)

            def everyone_known() -> bool:
                return all(_known_nodes(client) >= total for client in clients.values())

            _wait(everyone_known, timeout, "every cluster node to know the others")
            ids = {node.port: _text(_command(clients[node.port], "CLUSTER", "MYID")) for node in primaries}
            for index, node in enumerate(replicas):
                primary = primaries[index % len(primaries)]
                _command(clients[node.port], "CLUSTER", "REPLICATE", ids[primary.port])
            self.wait_healthy(timeout)
        finally:
            for client in clients.values():
                client.close()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and every slot has a
        primary whose replicas (if any are running) are in sync."""

        def healthy() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                client = node.client()
                try:
                    info = _text(_command(client, "CLUSTER", "INFO"))
                    if "cluster_state:ok" not in info:
                        return False
                    role = client.info("replication")
                    if role.get("role") == "slave" and role.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return True

        _wait(healthy, timeout, "the cluster to be healthy (cluster_state:ok, replicas in sync)")

    def primary_for(self, key: str | bytes) -> RedisNode:
        """The node serving ``key``'s slot now (asked from a running node)."""
        seed = next(node for node in self.nodes if node.running)
        client = seed.client()
        try:
            slot = int(_command(client, "CLUSTER", "KEYSLOT", key))
            for first, last, primary, *_ in _command(client, "CLUSTER", "SLOTS"):
                if int(first) <= slot <= int(last):
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        finally:
            client.close()
        raise TopologyError(f"no node serves the slot of {key!r}")

    def replicas_of(self, primary: RedisNode) -> list[RedisNode]:
        """The running replicas of ``primary``."""
        client = primary.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        ports = {
            int(value["port"])
            for name, value in info.items()
            if name.startswith("slave") and isinstance(value, dict)
        }
        return [node for node in self.nodes if node.port in ports and node.running]

    def manual_failover(self, replica: RedisNode) -> None:
        """``CLUSTER FAILOVER`` on ``replica``: it takes over its primary's slots, the primary stays
        up as its replica (clients still pointed at it get ``MOVED``)."""
        client = replica.client()
        try:
            _command(client, "CLUSTER", "FAILOVER")
        finally:
            client.close()

    def role_of(self, node: RedisNode) -> str:
        """``master`` or ``slave`` as the node itself reports it."""
        client = node.client()
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def close(self) -> None:
        """Stop every node and remove the folder."""
        for node in self.nodes:
            node.stop()
        self.nodes = []
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalRedisSentinel:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum 2) on 127.0.0.1.

    Args:
        service: The monitored primary's name (``sentinel monitor <service> ...``).
        replicas: Replica count.
        sentinels: Sentinel count (3: a majority survives the loss of one).
        down_after_ms: ``down-after-milliseconds``: silence after which the primary is down.
        failover_timeout_ms: ``failover-timeout``.
        binary: ``redis-server`` path; looked up on PATH when omitted.

    Example::

        with LocalRedisSentinel() as topology:
            config = RedisConfig(mode="sentinel", sentinels=topology.sentinel_addresses,
                                 sentinel_service=topology.service)
    """

    def __init__(
        self,
        service: str = "voxcore-primary",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 5000,
        binary: str | None = None,
    ) -> None:
        if sentinels < 1 or replicas < 1:
            raise ValueError("a Sentinel set needs at least one replica and one Sentinel")
        self.service = service
        self._binary = _binary(binary)
        self._replicas = replicas
        self._sentinels = sentinels
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._dir = tempfile.TemporaryDirectory(prefix="voxcore-sentinel-")
        self.data_nodes: list[RedisNode] = []
        self.sentinel_nodes: list[RedisNode] = []

    @property
    def sentinel_addresses(self) -> tuple[str, ...]:
        """``host:port`` of every Sentinel (for ``RedisConfig(sentinels=...)``)."""
        return tuple(node.address for node in self.sentinel_nodes)

    def start(self, timeout: float = 30.0) -> Self:
        """Start the data nodes and the Sentinels; wait until they all see each other."""
        if self.data_nodes:
            return self
        folder = Path(self._dir.name)
        try:
            primary_port = free_port()
            for index in range(1 + self._replicas):
                port = primary_port if index == 0 else free_port()
                node_dir = folder / f"data-{index}"
                node_dir.mkdir()
                log = node_dir / "redis.log"
                args = _base_args(self._binary, port, node_dir, log)
                if index:
                    args += ["--replicaof", _HOST, str(primary_port)]
                self.data_nodes.append(RedisNode(port, args, log))
            _start_all(self.data_nodes, timeout)
            self._wait_replicas_in_sync(timeout)
            for index in range(self._sentinels):
                port = free_port()
                node_dir = folder / f"sentinel-{index}"
                node_dir.mkdir()
                conf = node_dir / "sentinel.conf"
                conf.write_text(
                    "\n".join(
                        [
                            f"port {port}",
                            f"bind {_HOST}",
                            f"dir {node_dir}",
                            f"logfile {node_dir / 'sentinel.log'}",
                            f"sentinel monitor {self.service} {_HOST} {primary_port} 2",
                            f"sentinel down-after-milliseconds {self.service} {self._down_after_ms}",
                            f"sentinel failover-timeout {self.service} {self._failover_timeout_ms}",
                            f"sentinel parallel-syncs {self.service} 1",
                            "",
                        ]
                    )
                )
                args = [self._binary, str(conf), "--sentinel"]
                self.sentinel_nodes.append(RedisNode(port, args, node_dir / "sentinel.log"))
            _start_all(self.sentinel_nodes, timeout)
            self._wait_discovered(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_replicas_in_sync(self, timeout: float) -> None:
        def synced() -> bool:
            for node in self.data_nodes:
                if not node.running:
                    continue
                client = node.client()
                try:
                    info = client.info("replication")
                finally:
                    client.close()
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            return True

        _wait(synced, timeout, "the replicas to sync with the primary")

    def _wait_discovered(self, timeout: float) -> None:
        others = len(self.sentinel_nodes) - 1
        replicas = sum(1 for node in self.data_nodes[1:] if node.running)

        def discovered() -> bool:
            for node in self.sentinel_nodes:
                client = node.client(decode_responses=True)
                try:
                    state = _command(client, "SENTINEL", "MASTER", self.service)
                finally:
                    client.close()
                fields = _pairs(state)
                if int(fields.get("num-other-sentinels", 0)) < others:
                    return False
                if int(fields.get("num-slaves", 0)) < replicas:
                    return False
            return True

        _wait(discovered, timeout, "the Sentinels to discover each other and the replicas", interval=0.1)

    def primary(self) -> RedisNode:
        """The data node the Sentinels currently report as primary."""
        host_port = self.primary_address()
        port = int(host_port.rpartition(":")[2])
        return next(node for node in self.data_nodes if node.port == port)

    def primary_address(self) -> str:
        """``host:port`` of the primary as the first answering Sentinel reports it."""
        for node in self.sentinel_nodes:
            if not node.running:
                continue
            client = node.client(decode_responses=True)
            try:
                host, port = _command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                return f"{host}:{port}"
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
        raise TopologyError("no Sentinel answers")

    def manual_failover(self) -> None:
        """``SENTINEL FAILOVER``: a replica is promoted, the old primary stays up as a replica
        (a connection still pointed at it gets ``READONLY`` on a write)."""
        for node in self.sentinel_nodes:
            if not node.running:
                continue
            client = node.client()
            try:
                _command(client, "SENTINEL", "FAILOVER", self.service)
                return
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
        raise TopologyError("no Sentinel accepted SENTINEL FAILOVER")

    def wait_failover(self, old_primary: RedisNode, timeout: float = 30.0) -> RedisNode:
        """Wait until the Sentinels report another primary and it accepts writes; return it."""
        old = old_primary.address

        def moved() -> bool:
            address = self.primary_address()
            if address == old:
                return False
            node = self.primary()
            client = node.client()
            try:
                return client.info("replication").get("role") == "master"
            finally:
                client.close()

        _wait(moved, timeout, f"the Sentinels to promote a replica of {old}", interval=0.05)
        return self.primary()

    def close(self) -> None:
        """Stop every process and remove the folder."""
        for node in [*self.sentinel_nodes, *self.data_nodes]:
            node.stop()
        self.sentinel_nodes = []
        self.data_nodes = []
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _known_nodes(client: redis.Redis) -> int:
    lines = _text(_command(client, "CLUSTER", "NODES")).strip().splitlines()
    return sum(1 for line in lines if "handshake" not in line and "noaddr" not in line)


def _pairs(flat: Sequence[Any] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(flat, dict):
        return flat
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call,unused-ignore]
