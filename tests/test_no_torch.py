"""`robix --help` and the bus tools never import torch or transformers.

Each check runs in a fresh interpreter, so what this test process imported does not matter.
Stub ``torch`` and ``transformers`` packages are put first on the path, so an import of
either would succeed and be seen even on a machine where they are not installed (and a
``try: import torch`` would not hide it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")


@pytest.fixture
def stub_env(tmp_path, bus_env):
    stubs = tmp_path / "stubs"
    for name in HEAVY:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("PYTHONPATH")]))
    return env


def imported_modules(env, *args: str) -> set[str]:
    """Top-level names of every module ``python -X importtime *args`` imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # echo without a publisher exits 1
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_the_check_sees_an_import_of_torch(stub_env):
    assert {"torch", "transformers"} <= imported_modules(stub_env, "-c", "import torch, transformers")


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["topic", "--help"],
    ["topic", "list"],
    ["topic", "echo", "/nobody", "--timeout-s", "0.1"],
    ["record", "--help"],
    ["replay", "--help"],
], ids=lambda a: " ".join(a))
def test_robix_command_does_not_import_torch(stub_env, argv):
    names = imported_modules(stub_env, "-m", "robix_planner.cli", *argv)
    assert "robix_planner" in names and "argparse" in names  # the command did run
    if argv[0] == "topic" and argv[1] != "--help":
        assert "zmq" in names  # ... and joined the bus
    assert not names & set(HEAVY), f"robix {' '.join(argv)} imported {sorted(names & set(HEAVY))}"


def test_importing_the_cli_and_tools_does_not_import_torch(stub_env):
    code = ("import sys, robix_planner.cli, robix_planner.tools.topic, robix_planner.tools.record; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=stub_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
