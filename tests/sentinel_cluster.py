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


class SentinelCluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        aof = ("--appendonly", "yes")  # a primary restarted in place must not come back empty
        self.primary = RedisServer(directory / "primary", None, *aof).start()
        self.link = DelayProxy("127.0.0.1", self.primary.port, 0.0)
        through_link = ("--replicaof", "127.0.0.1", str(self.link.port), "--replica-announce-ip", "127.0.0.1")
        self.replica = RedisServer(directory / "replica", None, *aof, *through_link).start()
        wait_for(lambda: self._info(self.replica.port, "replication").get("master_link_status") == "up", timeout=20)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = [self._sentinel(port) for port in self.sentinel_ports]
        wait_for(lambda: all(self._knows_replica(port) for port in self.sentinel_ports), timeout=30)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def primary_port(self) -> int:
        _, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def kill_primary(self) -> None:
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait()
        wait_for(lambda: self.primary_port() == self.replica.port, timeout=60, interval=0.2)

    def settle(self) -> None:
        """Until the old primary is in sync as the new primary's replica: before that, a second failover
        could promote an empty node (Sentinel does), which no client can protect against."""
        wait_for(lambda: self._info(self.primary.port, "replication").get("master_link_status") == "up", 60, 0.2)

    def restart_old_primary(self) -> None:
        """The dead node back (empty): the Sentinels make it a replica of the new primary."""
        self.primary.start()
        self.settle()

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
            proc.wait(timeout=10)
        self.link.close()
        for server in (self.replica, self.primary):
            if server.proc is not None and server.proc.poll() is None:
                server.stop()

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

    def _knows_replica(self, port: int) -> bool:
        try:
            replicas = redis.Redis(port=port).sentinel_slaves(MASTER)
        except redis.RedisError:
            return False
        return any(int(r["port"]) == self.replica.port for r in replicas)

    def _info(self, port: int, section: str) -> dict:
        try:
            return redis.Redis(port=port).info(section)
        except redis.RedisError:
            return {}
