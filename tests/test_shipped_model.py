"""robix-tiny as shipped in the package: found by name, small, and it plans test-split episodes.

The checkpoint is the one the README's main command runs (launch/robix_tiny.yaml,
``model.path=robix-tiny``); its model card is ``robix_planner/models/robix_tiny/checkpoint/README.md``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from robix_planner.backends import load_backend  # noqa: E402
from robix_planner.backends.base import ModelConfig  # noqa: E402
from robix_planner.backends.hf import shipped_model_dir  # noqa: E402
from robix_planner.config import ConfigError  # noqa: E402

SHIPPED = shipped_model_dir("robix-tiny")
ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_checkpoint_is_complete_small_and_has_a_model_card():
    files = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
            "README.md"} <= files
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert json.loads((SHIPPED / "config.json").read_text())["model_type"] == "robix_tiny"
    card = (SHIPPED / "README.md").read_text()
    for heading in ("## Training", "## Evaluation", "## Ablations"):
        assert heading in card


def test_model_path_robix_tiny_names_the_shipped_checkpoint_and_a_directory_wins(tmp_path, monkeypatch,
                                                                                  torch_one_thread):
    backend = load_backend(ModelConfig(backend="hf", path="robix-tiny"))
    try:
        assert type(backend.model).__name__ == "RobixTinyForConditionalGeneration"
    finally:
        backend.close()
    # A directory of that name in the working directory is what the user meant.
    monkeypatch.chdir(tmp_path)
    os.mkdir("robix-tiny")
    with pytest.raises(ConfigError, match="model.path"):
        load_backend(ModelConfig(backend="hf", path="robix-tiny"))


@pytest.fixture(scope="module")
def offline(torch_one_thread):
    from sim.eval import offline_steps, run_offline, summarize_offline

    steps = offline_steps("test", categories=["multi_stage", "interrupted", "invalid", "ambiguous"], limit=1,
                          progress=False)
    backend = load_backend(ModelConfig(backend="hf", path="robix-tiny", max_new_tokens=256))
    try:
        scores = run_offline(steps, backend, progress=False)
    finally:
        backend.close()
    return summarize_offline(scores), scores


def test_the_shipped_model_answers_unseen_test_steps_in_format_with_valid_acceptable_commands(offline):
    summary, scores = offline
    everything = summary["categories"]["all"]
    # Plans are decoded within the controller's commands: never one outside its grammar and vocabulary.
    assert everything.invalid_plans == 0 and everything.backend_errors == 0
    assert everything.parse_failure_rate <= 0.1, [s.output for s in scores if s.parse_error]
    # robix-tiny is weak (the model card: 46.7% of all 486 test steps); this floor catches a
    # broken checkpoint, processor or prompt format, which scores near 0.
    assert everything.accuracy >= 0.3, [(s.category, s.output) for s in scores if not s.correct]


def test_the_readme_main_job_runs_robix_tiny_in_the_simulated_scene_to_its_end(bus_env):
    """launch/robix_tiny_sim.yaml (the README's main command): the planner process loads the shipped
    model, the scenario runs to its end over the bus, the score is printed, exit code 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the planner's torch leaves a core to the world and the bus
    run = subprocess.run([sys.executable, "-m", "robix_planner.cli", "launch", "launch/robix_tiny_sim.yaml",
                          "nodes.sim.params.time_scale=5", "--timeout-s", "240", "--color", "never"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    # The planner process loaded the shipped checkpoint, and the model decided at least once.
    assert re.search(r"hf backend: \S*robix_tiny/checkpoint on cpu", out), out[-3000:]
    score = re.search(r"score \S+-test-\d+: progress \d+% \(\d+/\d+ predicates\), (success|FAILED);.*?; (\d+) decisions",
                      out)
    assert score and int(score.group(2)) >= 1, out[-3000:]
    assert "TRUNCATED" not in out
