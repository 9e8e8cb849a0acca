"""
The registries the benchmarks run on: a fresh embedded registry in a
temporary directory, or ZooKeeper (a standalone server of their own, as the
tests start it, or C{--zk HOSTS}) in a chroot of their own, deleted
afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path


@asynccontextmanager
async def registry_backend(
    backend: str, zk_hosts: str | None, prefix: str
) -> AsyncIterator[tuple[str, Path]]:
    """
    Yield (registry URL, scratch directory) for C{backend} (C{embedded} or
    C{zookeeper}), and clean both up afterwards.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"skynet-{prefix}-{backend}-"))
    server = None
    chroot = None
    hosts = zk_hosts
    try:
        if backend == "embedded":
            yield f"file://{workdir}/registry", workdir
        else:
            if not hosts:
                from tests.zkserver import ZooKeeperCluster

                server = ZooKeeperCluster(1)
                server.start()
                hosts = server.hosts
            chroot = f"/{prefix}-{os.getpid()}-{int(time.time())}"
            yield f"zk://{hosts}{chroot}/skynet", workdir
    finally:
        if chroot is not None and hosts:
            delete_tree(hosts, chroot)
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def delete_tree(hosts: str, path: str) -> None:
    """
    Delete C{path} and below in ZooKeeper; a failure is said, not raised.
    """
    from kazoo.client import KazooClient

    zk = KazooClient(hosts)
    try:
        zk.start(timeout=15)
        zk.delete(path, recursive=True)
    except Exception as e:  # noqa: BLE001 - leftovers are harmless, but say so
        print(f"could not delete {path} in ZooKeeper: {e!r}", file=sys.stderr)
    finally:
        zk.stop()
        zk.close()
