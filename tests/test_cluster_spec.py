"""
Tests for L{skynet.cluster.spec}: the desired state, its stored form, the
C{sky apply} file and the diff.
"""

from __future__ import annotations

import json

import attr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skynet.cluster.spec import (
    DESIRED_KEY,
    ClusterDeployment,
    DesiredState,
    SpecError,
    apply_changes,
    diff,
    parse_apply_file,
    parse_apply_text,
)

FILE = """
[services.Fibonacci]
run = "examples.fibonacci:Fibonacci"
instances = 3

[services.Echo]
run = "examples.echo:Echo"
instances = 2
args = "--stats-interval 1"
version = "2"
region = "eu"
spread = "none"
hosts = ["127.0.0.3", "127.0.0.2"]
ready_timeout = 5
"""


def test_parse_file() -> None:
    deployments = {d.name: d for d in parse_apply_text(FILE, "c.toml")}
    assert deployments["Fibonacci"] == ClusterDeployment(
        name="Fibonacci", run="examples.fibonacci:Fibonacci", instances=3
    )
    echo = deployments["Echo"]
    assert echo.args == ("--stats-interval", "1")
    assert echo.hosts == ("127.0.0.2", "127.0.0.3")
    assert echo.spread == "none"
    assert echo.ready_timeout == 5.0
    assert echo.deploy_args() == ["--version", "2", "--region", "eu", "--stats-interval", "1"]


def test_defaults() -> None:
    (d,) = parse_apply_text('[services.A]\nrun = "m:A"\n')
    assert (d.instances, d.spread, d.hosts, d.args, d.version) == (1, "host", (), (), None)


def test_command_line_run_gets_no_version_args() -> None:
    d = ClusterDeployment(name="C", run="/bin/sleep 100", version="3", region="eu")
    assert not d.is_class
    assert d.deploy_args() == []


@pytest.mark.parametrize(
    "table, message",
    [
        ("instances = 3", "[services.Fibonacci]: run is required"),
        ('run = "m:C"\ninstances = "three"', "[services.Fibonacci]: instances must be a whole"),
        ('run = "m:C"\ninstances = -1', "instances must be between 0"),
        ('run = "m:C"\ninstances = true', "instances must be a whole number"),
        ('run = "m:C"\nspread = "rack"', "[services.Fibonacci]: spread must be one of"),
        ('run = "m:C"\nhosts = [1]', "hosts must be a list of host addresses"),
        ('run = "m:C"\nhosts = ["a", "a"]', "hosts lists a host twice"),
        ('run = "m:C"\nreplicas = 3', "[services.Fibonacci]: unknown field replicas"),
        ('run = "m:C"\nargs = [1, 2]', "args must be a list of strings"),
        ('run = "m:C"\nargs = "\'open"', "args is not a valid argument string"),
        ('run = "\'unclosed"', "run is not a valid command line"),
        ('run = "  "', "run must be module:Class"),
        ('run = "m:C"\nversion = "a/b"', "version must be up to 64"),
        ('run = "m:C"\nready_timeout = 0', "ready_timeout must be above 0"),
    ],
)
def test_bad_fields_name_table_and_field(table: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_apply_text(f"[services.Fibonacci]\n{table}\n", "c.toml")
    assert str(e.value).startswith("c.toml: ")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[services.Fib", "not valid TOML"),
        ("", "no [services.<Name>] table"),
        ("services = 3", "services must be tables"),
        ('[service.A]\nrun = "m:A"', "unknown top-level key service"),
        ('[services."a b"]\nrun = "m:A"', "deployment name must be"),
        ("[services]\nA = 3", "[services.A]: must be a table"),
    ],
)
def test_bad_files(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=None) as e:
        parse_apply_text(text, "c.toml")
    assert message in str(e.value)


def test_parse_file_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        parse_apply_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match="not UTF-8"):
        parse_apply_file(str(bad))
    good = tmp_path / "good.toml"
    good.write_text(FILE)
    assert sorted(d.name for d in parse_apply_file(str(good))) == ["Echo", "Fibonacci"]


def test_stored_round_trip() -> None:
    state = DesiredState(parse_apply_text(FILE))
    data = state.to_bytes()
    doc = json.loads(data)
    assert doc["format"] == 1
    assert doc["deployments"]["Fibonacci"]["instances"] == 3
    assert DesiredState.from_bytes(data) == state
    assert DesiredState.from_bytes(None) == DesiredState()
    assert DESIRED_KEY == "cluster/desired"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{", "not JSON"),
        (b"[]", "not a desired-state document"),
        (b'{"format": 2, "deployments": {}}', "has format 2"),
        (
            b'{"format": 1, "deployments": {"A": {"run": "m:A", "instances": "x"}}}',
            "deployment 'A': instances must be",
        ),  # fmt: skip
    ],
)
def test_stored_garbage(data: bytes, message: str) -> None:
    with pytest.raises(SpecError) as e:
        DesiredState.from_bytes(data)
    assert message in str(e.value)


def test_duplicate_names_refused() -> None:
    a = ClusterDeployment(name="A", run="m:A")
    with pytest.raises(SpecError, match="unique"):
        DesiredState([a, a])
    with pytest.raises(SpecError, match="named twice: A"):
        diff(DesiredState(), [a, a])


def test_diff() -> None:
    stored = DesiredState(
        [
            ClusterDeployment(name="A", run="m:A", instances=3),
            ClusterDeployment(name="B", run="m:B", instances=1),
            ClusterDeployment(name="Old", run="m:O"),
        ]
    )
    wanted = [
        ClusterDeployment(name="A", run="m:A", instances=5),
        ClusterDeployment(name="B", run="m:B", instances=1, version="2"),
        ClusterDeployment(name="C", run="m:C"),
    ]
    changes = {c.name: c for c in diff(stored, wanted)}
    assert set(changes) == {"A", "B", "C"}
    assert changes["A"].kind == "change"
    assert changes["A"].fields == (("instances", 3, 5),)
    assert not changes["A"].rolls
    assert changes["A"].describe() == "~ A: instances 3 -> 5"
    assert changes["B"].rolls
    assert changes["B"].describe() == "~ B: version (none) -> 2 (rolling replacement)"
    assert changes["C"].kind == "add"
    assert changes["C"].describe().startswith("+ C: 1 x m:C")

    pruned = {c.name: c.kind for c in diff(stored, wanted, prune=True)}
    assert pruned["Old"] == "remove"
    new_state = apply_changes(stored, diff(stored, wanted, prune=True))
    assert new_state.names == ["A", "B", "C"]
    # Applying again changes nothing.
    assert {c.kind for c in diff(new_state, wanted, prune=True)} == {"same"}


def test_generation_is_stored_not_read_from_files() -> None:
    d = ClusterDeployment(name="A", run="m:A", generation=2)
    assert d.fingerprint != attr.evolve(d, generation=3).fingerprint
    assert DesiredState.from_bytes(DesiredState([d]).to_bytes()).get("A").generation == 2
    with pytest.raises(SpecError, match="unknown field generation"):
        parse_apply_text('[services.A]\nrun = "m:A"\ngeneration = 3\n')
    (change,) = diff(DesiredState([d]), [ClusterDeployment(name="A", run="m:A")])
    assert change.kind == "same"
    with pytest.raises(SpecError, match="generation must be"):
        ClusterDeployment(name="A", run="m:A", generation=-1)


def test_fingerprint_follows_what_the_instance_runs() -> None:
    base = ClusterDeployment(name="A", run="m:A")
    import attr

    assert attr.evolve(base, instances=7).fingerprint == base.fingerprint
    assert attr.evolve(base, hosts=("h",)).fingerprint == base.fingerprint
    for change in ({"run": "m:B"}, {"args": ("-x",)}, {"version": "2"}, {"region": "r"}):
        assert attr.evolve(base, **change).fingerprint != base.fingerprint


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True)
deployments = st.builds(
    ClusterDeployment,
    name=names,
    run=st.sampled_from(["m:A", "pkg.mod:Class", "/bin/sleep 10"]),
    instances=st.integers(0, 50),
    args=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    version=st.none() | st.from_regex(r"[a-z0-9.]{1,5}", fullmatch=True),
    spread=st.sampled_from(["host", "region", "none"]),
    hosts=st.lists(st.sampled_from(["127.0.0.2", "127.0.0.3", "h"]), unique=True).map(tuple),
)


@given(st.lists(deployments, max_size=5, unique_by=lambda d: d.name))
def test_round_trip_property(ds) -> None:
    state = DesiredState(ds)
    assert DesiredState.from_bytes(state.to_bytes()) == state
