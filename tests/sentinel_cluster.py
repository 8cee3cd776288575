"""A Redis primary, a replica and three Sentinels on loopback ports, for the failover tests.

The replica replicates through a proxy (``tests/proxy.py``) so that a test can stop the
replication link (``hold``): what the primary takes then is on the primary only, and lost when
it dies, as asynchronous replication allows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from tests.helpers import wait_for
from tests.proxy import DelayProxy
from workers.devstack.embedded_redis import RedisServer, free_port, redis_server_binary

MASTER = "trainbus-primary"
AOF = ("--appendonly", "yes")  # a node restarted in place must not come back empty


class SentinelCluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.primary = RedisServer(directory / "primary", None, *AOF).start()
        self.link = DelayProxy("127.0.0.1", self.primary.port, 0.0)
        through_link = ("--replicaof", "127.0.0.1", str(self.link.port), "--replica-announce-ip", "127.0.0.1")
        self.replica = RedisServer(directory / "replica", None, *AOF, *through_link).start()
        wait_for(lambda: self._info(self.replica.port, "replication").get("master_link_status") == "up", timeout=20)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = [self._sentinel(port) for port in self.sentinel_ports]
        self.settle()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    @property
    def nodes(self) -> tuple[RedisServer, RedisServer]:
        return self.primary, self.replica  # named for their roles at the start; a failover swaps the roles

    def primary_port(self) -> int:
        _, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def current_primary(self) -> RedisServer:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; returns once the Sentinels have promoted the other node."""
        dead = self.current_primary()
        assert dead.proc is not None
        dead.proc.kill()
        dead.proc.wait()
        dead.proc = None
        wait_for(lambda: self.primary_port() != dead.port, timeout=60, interval=0.2)
        return dead

    def restart(self, node: RedisServer) -> None:
        """A stopped node back with its AOF: a replica of the current primary unless it still is the
        primary (stopped too briefly for a failover); then until every node is in sync."""
        primary = self.primary_port()
        replica_of = () if primary == node.port else ("--replicaof", "127.0.0.1", str(primary))
        node.extra = (*AOF, *replica_of, "--replica-announce-ip", "127.0.0.1")
        node.start()
        self.settle()

    def restart_old_primary(self) -> None:
        """The dead first primary back: the Sentinels' new primary's replica."""
        self.restart(self.primary)

    def settle(self) -> None:
        """Until the Sentinels agree on a primary and the other node is in sync as its replica, seen by
        them as such: before that a second failover could promote a node that has not caught up (or
        find none to promote), which no client can protect against."""
        wait_for(self._settled, timeout=90, interval=0.2)

    def _settled(self) -> bool:
        try:
            addrs = {redis.Redis(port=p).sentinel_get_master_addr_by_name(MASTER) for p in self.sentinel_ports}
            if len(addrs) != 1:
                return False
            port = int(next(iter(addrs))[1])
            if self._info(port, "replication").get("role") != "master":
                return False
            for node in self.nodes:
                if node.port == port:
                    continue
                info = self._info(node.port, "replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
                if info.get("master_port") not in (port, self.link.port):
                    return False
                for sentinel in self.sentinel_ports:
                    seen = {int(r["port"]): r for r in redis.Redis(port=sentinel).sentinel_slaves(MASTER)}
                    flags = seen.get(node.port, {})
                    if not flags or flags.get("is_sdown") or flags.get("is_disconnected"):
                        return False
                    if flags.get("master-link-status") != "ok":
                        return False
            return True
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
            proc.wait(timeout=10)
        self.link.close()
        for node in self.nodes:
            node.stop()

    def _sentinel(self, port: int) -> subprocess.Popen:
        work = self.dir / f"sentinel-{port}"
        work.mkdir()
        conf = work / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {work}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 4000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        proc = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: self._answers(port), timeout=20)
        return proc

    def _answers(self, port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
        except redis.ConnectionError:
            return False

    def _info(self, port: int, section: str) -> dict:
        try:
            return redis.Redis(port=port).info(section)
        except redis.RedisError:
            return {}
