"""
Marks every test that starts real processes or servers C{slow}, so that
C{pytest -m "not slow"} is truly the fast suite (in-memory, fake clocks).

Whole modules, classes of mixed modules, and a few single tests are listed
here rather than marked one by one, so that a new real-process test in a
listed module or class is slow without anyone remembering to say so.  A
module may still mark itself (C{pytestmark = pytest.mark.slow}).
"""

from __future__ import annotations

import pytest

#: Modules every test of which runs real processes (twistd, ZooKeeper, ssh,
#: Chromium, benchmarks, the example scripts).
SLOW_MODULES = {
    "test_benchmark_chaos",
    "test_benchmark_compare",
    "test_benchmark_registry",
    "test_benchmark_rpc",
    "test_cluster",
    "test_dashboard_browser",
    "test_examples",
    "test_fuzz_attacks",
    "test_sky",
    "test_ssh_shell",
    "test_zookeeper_cluster",
}

#: Classes of mixed modules that run real processes or servers.
SLOW_CLASSES = {
    "test_daemon": {"DaemonProcessTests", "ZooKeeperDaemonTests", "CommandLineTests"},
    "test_registry_zookeeper": {
        "StandaloneTests",
        "StartWhileDownTests",
        "EnsembleTests",
        "ZooKeeperConformanceTests",
    },
    "test_web": {"DashboardTapTests"},
    "test_service": {"ImportTests", "ZooKeeperShutdownTests", "ElementCounterTests"},
    "test_config": {"ConfigTests"},
    "test_fuzz": {"RealServiceFuzzTests"},
}

#: Single tests that spawn a child process in otherwise fast classes.
SLOW_TESTS = {
    "test_registry_files": {
        "test_crash_of_real_process",
        "test_query_hides_dead_owner_at_once",
        "test_crash_detection",
    },
}


def is_slow(item: pytest.Item) -> bool:
    """
    Whether C{item} is listed here as a real-process test.
    """
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    cls = item.cls.__name__ if item.cls is not None else ""
    name = getattr(item, "originalname", None) or item.name
    return (
        module in SLOW_MODULES
        or cls in SLOW_CLASSES.get(module, ())
        or name in SLOW_TESTS.get(module, ())
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        if isinstance(item, pytest.Function) and is_slow(item):
            item.add_marker(slow)
