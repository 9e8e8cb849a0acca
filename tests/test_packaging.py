"""
Tests of the README's two commands on a fresh machine, and of the packaging.

The system set-up (C{scripts/system-deps}, called by C{make test} and C{make
cluster}) runs here against a C{PATH} without C{java} and the rest, with fake
C{apt-get}, C{dpkg} and C{id}: nothing is really installed.  The slow tests
install skynet into a new virtualenv with the Makefile's own targets and
check that C{twistd} sees the plugins, that the runtime install holds no
test or dev tools, and that building prints no warning of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What the scripts may run, taken from the real system; java, chromium, ssh,
# tmux and ip are deliberately not among them.
TOOLS = ["bash", "make", "env", "cat", "dirname", "sh", "touch", "chmod", "mkdir", "rm"]

TEST_PACKAGES = ["zookeeper", "default-jre-headless", "chromium", "openssh-client", "tmux",
                 "iproute2"]  # fmt: skip


class FakeSystem:
    """
    A bin directory standing in for a fresh Debian machine.

    C{apt-get} records its arguments in C{apt.log}; on C{install} it
    "installs" each package by creating the commands it provides and marking
    it in the fake C{dpkg}'s database.  C{id -u} prints C{uid}.
    """

    PROVIDES = {"default-jre-headless": "java", "chromium": "chromium",
                "openssh-client": "ssh", "tmux": "tmux", "iproute2": "ip"}  # fmt: skip

    def __init__(self, base: Path, uid: int = 0, apt: bool = True, apt_fails: bool = False):
        self.bin = base / "bin"
        self.bin.mkdir()
        self.db = base / "dpkg"
        self.db.mkdir()
        self.apt_log = base / "apt.log"
        for tool in TOOLS:
            found = shutil.which(tool)
            assert found, tool
            (self.bin / tool).symlink_to(found)
        self.script("id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"')
        self.script("dpkg", f'[ "$1" = -s ] && [ -e "{self.db}/$2" ]')
        if apt:
            provides = " ".join(f"{k}={v}" for k, v in self.PROVIDES.items())
            install = (
                ""
                if apt_fails
                else f"""
              for pkg in "$@"; do
                touch "{self.db}/$pkg"
                for pair in {provides}; do
                  if [ "${{pair%%=*}}" = "$pkg" ]; then
                    printf '#!/bin/sh\\n' > "{self.bin}/${{pair#*=}}"
                    chmod +x "{self.bin}/${{pair#*=}}"
                  fi
                done
              done"""
            )
            self.script(
                "apt-get",
                f"""
              echo "$DEBIAN_FRONTEND $*" >> "{self.apt_log}"
              [ "$1" = install ] || exit 0
              {"exit 100" if apt_fails else ""}
              {install}""",
            )

    def script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def apt_calls(self) -> list[str]:
        return self.apt_log.read_text().splitlines() if self.apt_log.exists() else []

    def run(self, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
        env = {"PATH": str(self.bin), "HOME": str(self.bin.parent), "PYTHON": python}
        return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip


def test_fake_path_lacks_the_tools(tmp_path: Path) -> None:
    """
    The premise of the tests below: their PATH finds no java.
    """
    system = FakeSystem(tmp_path)
    result = system.run("bash", "-c", "command -v java || echo none")
    assert result.stdout.strip() == "none"


def test_as_root_installs_what_is_missing(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0)
    result = system.run("make", "--no-print-directory", "system-deps-test")
    assert result.returncode == 0, result.stderr
    update, install = system.apt_calls()
    assert update == "noninteractive update -qq"
    assert install.split() == ["noninteractive", "install", "-y", "-qq",
                               "--no-install-recommends", *TEST_PACKAGES]  # fmt: skip
    assert "installing the system packages" in result.stdout


def test_installs_only_what_is_missing(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0)
    system.script("java", "true")
    system.script("tmux", "true")
    (system.db / "zookeeper").touch()
    result = system.run("scripts/system-deps", "test")
    assert result.returncode == 0, result.stderr
    assert system.apt_calls()[-1].split()[5:] == ["chromium", "openssh-client", "iproute2"]


def test_nothing_missing_is_silent(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0)
    for command in FakeSystem.PROVIDES.values():
        system.script(command, "true")
    (system.db / "zookeeper").touch()
    result = system.run("scripts/system-deps", "test")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert system.apt_calls() == []


def test_make_test_without_root_stops_before_the_tests_with_the_command(tmp_path: Path) -> None:
    """
    Not root and no sudo: C{make test} stops before creating a venv or
    running pytest, and prints the one command that installs the packages.
    """
    system = FakeSystem(tmp_path, uid=1000)
    result = system.run("make", "--no-print-directory", "test", "VENV=" + str(tmp_path / "venv"))
    assert result.returncode != 0
    command = "sudo apt-get install -y --no-install-recommends " + " ".join(TEST_PACKAGES)
    assert command in result.stderr
    assert system.apt_calls() == []
    assert not (tmp_path / "venv").exists()
    assert "pytest" not in result.stdout + result.stderr


def test_failing_apt_stops(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0, apt_fails=True)
    result = system.run("scripts/system-deps", "test")
    assert result.returncode != 0
    assert len(system.apt_calls()) == 2


def test_no_apt_names_the_packages(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0, apt=False)
    result = system.run("scripts/system-deps", "test")
    assert result.returncode == 1
    assert "needs these system packages: " + " ".join(TEST_PACKAGES) in result.stderr


def test_make_cluster_without_venv_support_stops_with_the_command(tmp_path: Path) -> None:
    """
    A Python without ensurepip (Debian without python3-venv): C{make cluster}
    stops before anything else and says what to install.
    """
    system = FakeSystem(tmp_path, uid=1000)
    python = tmp_path / "python3"
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 1\nexit 3\n')
    python.chmod(0o755)
    result = system.run("make", "--no-print-directory", "cluster",
                        "VENV=" + str(tmp_path / "venv"), python=str(python))  # fmt: skip
    assert result.returncode != 0
    assert "sudo apt-get install -y --no-install-recommends python3-venv" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_cluster_needs_nothing_from_apt_here(tmp_path: Path) -> None:
    system = FakeSystem(tmp_path, uid=0)
    result = system.run("scripts/system-deps", "cluster")
    assert (result.returncode, system.apt_calls()) == (0, [])


def test_ci_runs_only_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines()
                if line and not line.startswith("#") and not line.startswith("set ")]  # fmt: skip
    assert commands == ['cd "$(dirname "$0")/.."', "scripts/system-deps make",
                        'exec make test PYTEST_ARGS="-ra ${PYTEST_ARGS:-}" </dev/null']  # fmt: skip


# Lines this machine's own pip and Python settings print on every install:
# not skynet's packaging.
ENVIRONMENT_NOISE = ("is ignored: it is neither a file nor a directory",
                     "byte-compiling is disabled")  # fmt: skip


def our_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if "warn" in line.lower() and not any(n in line for n in ENVIRONMENT_NOISE)]  # fmt: skip


def twistd_plugins(venv: Path) -> set[str]:
    result = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True,
                            text=True, timeout=60, cwd="/")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {word for word in result.stdout.split() if word.startswith("skynet-")}


def can_import(venv: Path, module: str) -> bool:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                            capture_output=True, cwd="/", timeout=60)  # fmt: skip
    return result.returncode == 0


@pytest.mark.slow
def test_fresh_install_with_the_makefile(tmp_path: Path) -> None:
    """
    The runtime install of C{make cluster}, then C{make setup}: both editable
    installs let C{twistd} (run from elsewhere) list the three plugins, and
    the runtime one holds no test or dev tools.
    """
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    plugins = {"skynet-service", "skynet-daemon", "skynet-dashboard"}

    make = ["make", "--no-print-directory", f"VENV={venv}"]
    subprocess.run([*make, f"{venv}/bin/.skynet-runtime"], cwd=ROOT, env=env, check=True,
                   timeout=600)  # fmt: skip
    assert twistd_plugins(venv) == plugins
    # Everything make cluster runs imports with the runtime alone.
    cluster = ["skynet.client", "skynet.service_tap", "skynet.daemon_tap", "skynet.dashboard_tap",
               "skynet.sky", "skynet.tls", "skynet.manhole", "examples.local_cluster"]  # fmt: skip
    assert [m for m in cluster if not can_import(venv, m)] == []
    assert not any(can_import(venv, m) for m in ("pytest", "playwright", "ruff", "mypy"))

    subprocess.run([*make, "setup"], cwd=ROOT, env=env, check=True, timeout=600)
    assert twistd_plugins(venv) == plugins
    assert all(can_import(venv, m) for m in ("pytest", "playwright", "hypothesis", "mypy"))

    # The editable install again, verbosely: no warning from our packaging.
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    result = subprocess.run([*pip, "install", "-v", "--no-deps", "--force-reinstall", "-e",
                             str(ROOT)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Building editable for skynet" in result.stdout
    assert our_warnings(result.stdout + result.stderr) == []
    assert twistd_plugins(venv) == plugins


@pytest.mark.slow
def test_wheel_ships_plugin_and_static_files_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                             str(tmp_path), str(ROOT)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert our_warnings(result.stdout + result.stderr) == []
    (wheel,) = tmp_path.glob("skynet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/skynet_plugin.py" in names
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names
    assert not any("dropin.cache" in name for name in names)
    static = {name for name in names if name.startswith("skynet/web/static/")}
    expected = {f"skynet/web/static/{p.name}" for p in (ROOT / "skynet/web/static").iterdir()}
    assert static == expected and len(static) >= 3
    assert "skynet/registry/zookeeper.py" in names
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
