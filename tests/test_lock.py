"""
requirements/lock.txt and requirements/runtime.txt say what setup.cfg says.

`make setup` installs the lock with `--require-hashes` and then lbws with
`--no-deps`, so nothing resolves setup.cfg's requirements again: a
requirement added to setup.cfg, or a bound moved past a pin, without `make
lock` would go unnoticed until an import fails or an untested release runs.
These tests read the files only, so they hold in the locked .venv and in
`make test-latest`'s .venv-latest alike.
"""

import configparser

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

RELOCK = "setup.cfg and requirements/ disagree: run `make lock`"


def declared(extra=None):
    """
    The requirements setup.cfg lists: the runtime ones, or those of C{extra}.
    """
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    if extra is None:
        lines = config["options"]["install_requires"]
    else:
        lines = config["options.extras_require"][extra]
    return [Requirement(line) for line in lines.splitlines() if line.strip()]


def pins(name):
    """
    {package: version} of the lock file C{name} for this interpreter, with
    the hashes each pin carries.
    """
    found = {}
    hashes = {}
    current = None
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        text = line.strip().rstrip("\\").strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("--hash="):
            if current is not None:
                hashes[current].append(text)
            continue
        requirement = Requirement(text)
        current = None
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name}: {text} is not a pin"
        current = canonicalize_name(requirement.name)
        assert current not in found, f"{name}: {current} pinned twice"
        found[current] = spec.version
        hashes[current] = []
    return found, hashes


@pytest.mark.parametrize("name", ["lock.txt", "runtime.txt"])
def test_every_pin_has_hashes(name):
    found, hashes = pins(name)
    assert found
    assert [package for package in found if not hashes[package]] == []


@pytest.mark.parametrize(
    "name, requirements",
    [("lock.txt", lambda: declared() + declared("test")), ("runtime.txt", declared)],
)
def test_the_lock_pins_what_setup_cfg_allows(name, requirements):
    found, _ = pins(name)
    wrong = []
    for requirement in requirements():
        package = canonicalize_name(requirement.name)
        version = found.get(package)
        if version is None or version not in requirement.specifier:
            wrong.append(f"{requirement} locked at {version}")
    assert wrong == [], RELOCK


def test_runtime_lock_has_the_versions_the_suite_runs_with():
    """
    deploy/Containerfile installs runtime.txt and the suite runs lock.txt:
    the image gets no release the suite did not run with.
    """
    locked, _ = pins("lock.txt")
    image, _ = pins("runtime.txt")
    assert {package: (version, locked.get(package)) for package, version in image.items()
            if locked.get(package) != version} == {}, RELOCK


@pytest.mark.parametrize("name", ["twisted", "autobahn", "pyopenssl"])
def test_libraries_lbws_reaches_into_have_an_upper_bound(name):
    """
    lbws/compat.py relies on Twisted's and Autobahn's internals, and
    lbws/transport on pyOpenSSL's error details: a release nobody ran the
    suite with must not reach a `pip install lbws` user.
    """
    (requirement,) = [r for r in declared() if canonicalize_name(r.name) == name]
    assert any(spec.operator == "<" for spec in requirement.specifier), str(requirement)
