"""The Gymnasium env: the env checker, seeding, rewards as progress deltas, episode end."""

import warnings

import gymnasium
import numpy as np
from gymnasium.utils.env_checker import check_env

from sim.scenarios import get_scenario
from sim.spec import PredicateType
from sim.world import TableBussingEnv, register_env


def test_check_env_passes_raw_and_made():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no spec" note for the raw env
        check_env(TableBussingEnv(render_mode="rgb_array"))
    env = gymnasium.make(register_env(), render_mode="rgb_array")
    check_env(env.unwrapped)
    env.close()


def test_reset_is_deterministic_for_a_seed():
    env = TableBussingEnv()
    a, _ = env.reset(seed=7)
    scene_a = env.scenario.scene
    b, _ = env.reset(seed=7)
    assert np.array_equal(a["head"], b["head"]) and env.scenario.scene == scene_a
    env.reset(seed=8)
    assert env.scenario.scene != scene_a


def test_solving_a_scenario_sums_rewards_to_one_and_terminates():
    scenario = get_scenario("multi_stage-test-001")
    env = TableBussingEnv(max_steps=40)
    obs, info = env.reset(seed=0, options={"scenario": scenario.id})
    assert obs["head"].shape == env.observation_space["head"].shape
    moves = [p for p in scenario.predicates if p.type is PredicateType.AT and p.location != "table"]
    total = info["progress"]
    _, r, term, trunc, info = env.step("put the hat into the bus tub")
    assert r == 0.0 and info["status"] == "rejected" and not term
    for i, p in enumerate(moves):
        obs, r, term, trunc, info = env.step(f"put the {p.object} into the {p.location}")
        assert info["status"] == "succeeded" and r > 0
        total += r
        assert term == (i == len(moves) - 1) and not trunc
    assert total == np.float64(1.0) or abs(total - 1.0) < 1e-9
    assert info["sim_time_s"] > 0


def test_forced_failures_and_truncation():
    scenario = get_scenario("failure_retry-test-001")  # slips twice
    env = TableBussingEnv(max_steps=2)
    env.reset(seed=0, options={"scenario": scenario})
    obj = scenario.failures[0].object
    rec = next(p.location for p in scenario.predicates if p.object == obj)
    _, r, term, trunc, info = env.step(f"put the {obj} into the {rec}")
    assert info["status"] == "failed" and r == 0 and not trunc
    _, r, term, trunc, info = env.step(f"put the {obj} into the {rec}")
    assert info["status"] == "failed" and trunc and not term
    assert env.world.location(obj) == "table"
