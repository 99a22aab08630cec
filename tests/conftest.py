"""Shared test fixtures: every test gets its own bus domain, so tests never see each other's nodes."""

from __future__ import annotations

import pytest

from robix_planner.bus import BusConfig


@pytest.fixture
def bus_config(tmp_path) -> BusConfig:
    """A bus config isolated in this test's temporary directory."""
    return BusConfig(graph_dir=str(tmp_path / "graph"), domain="test", discovery_period_s=0.02)


@pytest.fixture
def bus_env(tmp_path, monkeypatch):
    """Environment so that subprocesses (robix launch/topic/record) join this test's isolated bus."""
    graph = tmp_path / "graph"
    monkeypatch.setenv("ROBIX_GRAPH_DIR", str(graph))
    monkeypatch.setenv("ROBIX_DOMAIN", "test")
    return {"ROBIX_GRAPH_DIR": str(graph), "ROBIX_DOMAIN": "test"}


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module's tests (2 cores are shared with the bus threads), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
