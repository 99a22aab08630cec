"""Data synthesis (training.data): SFT episodes in the run-time prompt format, per-step rows, RL
candidates, the CPT corpus, reasoning traces, determinism for a seed, and `robix data`."""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.memory import Memory
from sim import catalog
from sim.scenarios import get_scenario
from training.data import cpt, traces
from training.data.adaptor import STOP_PHRASE, SYNTH_MEMORY
from training.data.episodes import (
    KINDS,
    build_rl,
    build_sft,
    capabilities_of,
    explode_steps,
    play,
    select_scenarios,
    to_prompt,
    training_steps,
)

#: A small slice with every kind of step: refusals, questions, retries, put-backs, a stop phrase.
CATS = ["invalid", "failure_retry", "interrupted", "ambiguous", "multi_stage"]


def same(a, b) -> bool:
    """Two datasets hold the same rows, images (their encoded bytes) included."""
    return a.features == b.features and a.data.table.equals(b.data.table)


@pytest.fixture(scope="module")
def sft():
    return build_sft("test", 7, categories=CATS, limit=6, progress=False)


@pytest.fixture(scope="module")
def steps(sft):
    return explode_steps(sft, progress=False)


def test_sft_is_deterministic_for_a_seed_images_included(sft):
    again = build_sft("test", 7, categories=CATS, limit=6, progress=False)
    assert same(sft, again)
    other = build_sft("test", 8, categories=CATS, limit=6, progress=False)
    assert not same(sft, other)
    # The seed only changes the wording of thoughts: the scenes, inputs and plans are the same.
    assert sft["images"][0][0].tobytes() == other["images"][0][0].tobytes()
    assert sft["acceptable"] == other["acceptable"] and sft["kind"] == other["kind"]


def test_an_episode_row_is_the_whole_conversation_in_the_run_time_format(sft):
    assert set(sft["category"]) == set(CATS) and set(sft["split"]) == {"test"}
    for row in sft:
        msgs = row["messages"]
        assert msgs[0]["role"] == "system" and [m["role"] for m in msgs[1:]] == ["user", "assistant"] * (len(msgs) // 2)
        placeholders = sum(c["type"] == "image" for m in msgs for c in m["content"])
        assert placeholders == len(row["images"]) == len(msgs) // 2  # one head view per step
        assert all(img.size == (160, 120) and img.mode == "RGB" for img in row["images"])
        assistants = [m for m in msgs if m["role"] == "assistant"]
        assert len(assistants) == len(row["kind"]) == len(row["acceptable"])
        caps = capabilities_of(row)
        assert msgs[0]["content"][0]["text"] == fmt.system_prompt(caps)
        for m, kind, ok in zip(assistants, row["kind"], row["acceptable"]):
            out = fmt.parse(m["content"][0]["text"])  # serialised with format.serialize: parses back
            plan = skills.parse(out.plan, caps).text if out.plan else ""
            assert kind in KINDS and plan in ok, (row["scenario_id"], kind, plan, ok)


def test_each_step_prompt_is_exactly_what_the_planners_memory_builds_at_run_time(steps):
    scenario = select_scenarios("test", categories=["interrupted"], limit=6)[5]  # a stop phrase inside
    ep = play(scenario)
    history = training_steps(ep, 7)
    memory = Memory(SYNTH_MEMORY)
    rows = [r for r in steps if r["scenario_id"] == scenario.id]
    assert len(rows) == len(history) and any(r["kind"] == STOP_PHRASE for r in rows)
    for k, (row, step) in enumerate(zip(rows, history)):
        runtime, images = fmt.to_hf_messages(memory.prompt(ep.capabilities, step.input))
        assert row["prompt"] == [{"role": m["role"], "content": [{"type": c["type"], "text": c.get("text")}
                                                                  for c in m["content"]]} for m in runtime]
        assert [np.asarray(i).tobytes() for i in row["images"]] == [i.pixels.tobytes() for i in images]
        assert row["completion"][0]["content"][0]["text"] == fmt.serialize(step.output) and row["step"] == k
        memory.append(step.input, step.output)


def test_to_prompt_reads_a_row_back_into_the_backend_prompt(steps):
    row = steps[7]
    prompt = to_prompt(row["prompt"], row["images"])
    messages, images = fmt.to_hf_messages(prompt)
    assert [{"role": m["role"], "content": [{"type": c["type"], "text": c.get("text")} for c in m["content"]]}
            for m in messages] == row["prompt"]
    assert [i.camera for i in images] == ["head"] * len(images)
    assert [i.pixels.tobytes() for i in images] == [np.asarray(i).tobytes() for i in row["images"]]
    with pytest.raises(ValueError, match="placeholders"):
        to_prompt(row["prompt"], row["images"][:-1])


def test_acceptable_plans_and_kinds_follow_the_situation(sft):
    rows = {r["scenario_id"]: r for r in sft}
    first = rows["multi_stage-test-000"]
    # Clearing a table has no order: at the first step, any movable object's put command.
    scene = get_scenario("multi_stage-test-000").scene
    movable = [o.name for o in scene.objects if catalog.home_receptacle(o.kind)]
    assert first["kind"][0] == "act" and len(first["acceptable"][0]) == len(movable) > 1
    kinds = Counter(k for r in sft for k in r["kind"])
    for kind in ("act", "retry", "put_back", "refuse", "ask", "done", "chat", STOP_PHRASE):
        assert kinds[kind] > 0, kind
    for r in sft:
        for kind, ok in zip(r["kind"], r["acceptable"]):
            if kind in ("retry", "put_back", STOP_PHRASE):
                assert len(ok) == 1  # forced
            if kind in ("refuse", "ask", "done", "chat"):
                assert ok == [""]  # no command is the right answer
    refusals = [r["category"] for r in sft for k in r["kind"] if k == "refuse"]
    assert refusals and set(refusals) == {"invalid"}


def test_thoughts_cover_scene_status_instructions_and_next_step_in_varied_words(sft):
    wordings = Counter()
    for r in sft:
        for m, kind in zip([m for m in r["messages"] if m["role"] == "assistant"], r["kind"]):
            if kind == STOP_PHRASE:
                continue
            thought = fmt.parse(m["content"][0]["text"]).thought
            facets = traces.facets_of(thought)
            assert {traces.SCENE, traces.STATUS, traces.INSTRUCTION, traces.NEXT} <= facets, thought
            assert re.search(r"gripper|I hold|holding", thought), thought
            assert len(thought) < 800  # short, for real time (Robix: < 200 tokens)
            wordings[traces.split_sentences(thought)[0].split(" ")[0]] += 1
    assert len(wordings) >= 3  # the scene sentence comes in several wordings


def test_rewrite_keeps_the_oracles_content_and_adds_missing_facets():
    rng = np.random.default_rng(0)
    thought = "On the table: red cup and fork; the gripper is empty. Waiting for the user's answer."
    out = traces.rewrite(thought, rng, traces.Facts(first=False, has_outcome=False, task="clear the table"))
    assert "red cup and fork" in out and "clear the table" in out
    facets = [traces.sentence_facets(s) for s in traces.split_sentences(out)]
    assert facets == [{traces.SCENE}, {traces.STATUS}, {traces.INSTRUCTION}, {traces.NEXT}], out
    kept = 'Sugar: cola 39 g, water bottle 0 g; the water bottle has the least.'
    assert kept in traces.rewrite(f"The table is empty; the gripper is empty. {kept}", rng,
                                  traces.Facts(first=True, has_outcome=False))
    assert traces.split_sentences('The user said "Stop. Now!" Next: stop.') == ['The user said "Stop. Now!"',
                                                                                "Next: stop."]


def test_without_reasoning_the_model_steps_have_the_minimal_thought():
    rows = build_sft("test", 0, categories=["interrupted"], limit=6, reasoning=False, progress=False)
    for r in rows:
        for m, kind in zip([m for m in r["messages"] if m["role"] == "assistant"], r["kind"]):
            thought = fmt.parse(m["content"][0]["text"]).thought
            if kind == STOP_PHRASE:  # the planner's own step keeps what the planner writes at run time
                assert "a stop phrase" in thought
            else:
                assert thought == traces.NO_REASONING


def test_explode_steps_gives_trl_prompt_completion_rows(sft, steps):
    assert len(steps) == sum(len(k) for k in sft["kind"])
    for row in steps:
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert sum(c["type"] == "image" for m in row["prompt"] for c in m["content"]) == len(row["images"])
        assert len(row["images"]) == row["step"] + 1
    model_only = explode_steps(sft, model_steps_only=True, progress=False)
    assert STOP_PHRASE not in set(model_only["kind"])
    assert len(model_only) == len(steps) - steps["kind"].count(STOP_PHRASE)
    # From a list of rows (PIL images) the same as from the Dataset (PNG bytes passed through).
    assert same(explode_steps(list(sft.select(range(3))), progress=False),
                explode_steps(sft.select(range(3)), progress=False))


def test_rl_candidates_carry_what_reward_functions_need():
    rl = build_rl("train", 0, categories=["failure_retry"], limit=3, progress=False)
    assert set(rl["split"]) == {"train"} and STOP_PHRASE not in set(rl["kind"])
    for row in rl:
        caps = capabilities_of(row)
        ref = fmt.parse(row["completion"][0]["content"][0]["text"])
        assert (skills.parse(ref.plan, caps).text if ref.plan else "") in row["acceptable"]
        assert all(p == "" or skills.parse(p, caps).text == p for p in row["acceptable"])  # normalised


def test_the_saved_dataset_loads_back_with_pil_images(sft, tmp_path):
    from datasets import load_from_disk

    sft.save_to_disk(str(tmp_path / "sft"))
    back = load_from_disk(str(tmp_path / "sft"))
    assert same(back, sft)
    assert back[0]["images"][0].tobytes() == sft[0]["images"][0].tobytes()


# --------------------------------------------------------------------------- CPT


def test_cpt_is_balanced_deterministic_and_seeded():
    n = 2 * len(cpt.TASKS)
    a = cpt.build_cpt(3, n, progress=False)
    assert Counter(a["task"]) == {t: 2 for t in cpt.TASKS}
    assert same(a, cpt.build_cpt(3, n, progress=False))
    assert not same(a, cpt.build_cpt(4, n, progress=False))
    for row in a:
        placeholders = sum(c["type"] == "image" for m in row["messages"] for c in m["content"])
        assert placeholders == len(row["images"])
        assert (len(row["images"]) == 0) == row["task"].startswith("text_")
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"][0]["text"]


def test_cpt_copy_tasks_answer_from_their_own_question():
    from robix_planner import skills
    from robix_planner.messages import Capabilities

    for i in range(12):
        quote = cpt.make_row(1, i, "text_quote")["messages"]
        q, a = quote[0]["content"][0]["text"], quote[1]["content"][0]["text"]
        assert f'"{a}"' in q
        left = cpt.make_row(1, i, "text_left")["messages"]
        q, a = left[0]["content"][0]["text"], left[1]["content"][0]["text"]
        moved = re.findall(r"The robot put the (.+?) away\.", q)
        held = re.match(r"(?:On the table|The table held):? (.+?)\. ", q).group(1)
        names = [n for n in re.split(r", | and ", held)]
        assert a == cpt._listing([n for n in names if n not in moved])
        nxt = cpt.make_row(1, i, "text_next")["messages"]
        q, a = nxt[0]["content"][0]["text"], nxt[1]["content"][0]["text"]
        objects = re.split(r", | and ", re.match(r"Objects: (.+?)\. Task", q).group(1))
        done = re.search(r"Already put away: (.+?)\. What", q).group(1)
        if a != "none: the task is done":
            caps = Capabilities(robot="t", skills=list(skills.TABLETOP_SKILLS), objects=objects,
                                receptacles=["bus tub", "trash bin", "basket"])
            parsed = skills.parse(a, caps)
            assert parsed.args["object"] in objects and parsed.args["object"] not in re.split(r", | and ", done)


def test_cpt_grounding_answers_point_at_the_object():
    for i in range(6):
        row = cpt.make_row(11, i, "ground_box")
        name = re.search(r"the (.+?)(\.| as|\?)", row["messages"][0]["content"][-1]["text"]).group(1)
        x0, y0, x1, y1 = map(int, re.findall(r"\d+", row["messages"][1]["content"][0]["text"]))
        assert 0 <= x0 < x1 <= 1000 and 0 <= y0 < y1 <= 1000
        img = np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])))  # rows hold PNG bytes
        h, w = img.shape[:2]
        crop = img[y0 * h // 1000:(y1 * h + 999) // 1000, x0 * w // 1000:(x1 * w + 999) // 1000].reshape(-1, 3)
        kind = next(k for k in sorted(catalog.KINDS, key=len, reverse=True) if name.endswith(k))
        colour = name[: -len(kind)].strip() or catalog.KINDS[kind].colours[0]
        rgb = np.array(catalog.object_rgb(kind, colour))
        assert (np.abs(crop.astype(int) - rgb).sum(axis=1) == 0).any(), name
        row = cpt.make_row(11, i, "ground_point")
        x, y = map(int, re.findall(r"\d+", row["messages"][1]["content"][0]["text"]))
        assert 0 <= x <= 1000 and 0 <= y <= 1000


def test_cpt_paraphrases_never_use_test_split_templates():
    from sim.spec import Split
    from sim.templates import TEMPLATES, split_of

    test_texts = {TEMPLATES[i][j].split("{")[0] for i in TEMPLATES for j in range(len(TEMPLATES[i]))
                  if split_of(i, j) is Split.TEST and len(TEMPLATES[i][j].split("{")[0]) > 12}
    for k in range(40):
        q = cpt.make_row(5, k, "text_paraphrase")["messages"][0]["content"][0]["text"]
        assert not any(t in q for t in test_texts), q


# --------------------------------------------------------------------------- CLI


def _run_data(argv: list[str]) -> int:
    from training.data.cli import register

    parser = argparse.ArgumentParser(prog="robix")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_robix_data_writes_datasets_equal_to_the_builders(tmp_path, capsys):
    from datasets import load_from_disk

    from robix_planner.config import ConfigError

    out = tmp_path / "sft"
    assert _run_data(["data", "sft", "--out", str(out), "--split", "test", "--category", "chat", "--limit", "2",
                      "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 episodes" in printed and "MB on disk" in printed
    assert same(load_from_disk(str(out)), build_sft("test", 3, categories=["chat"], limit=2, progress=False))
    with pytest.raises(ConfigError, match="not empty"):
        _run_data(["data", "sft", "--out", str(out), "--split", "test", "--limit", "1"])
    assert _run_data(["data", "cpt", "--out", str(tmp_path / "cpt"), "--n", "14", "--seed", "1"]) == 0
    assert same(load_from_disk(str(tmp_path / "cpt")), cpt.build_cpt(1, 14, progress=False))
    with pytest.raises(ConfigError, match="unknown CPT tasks"):
        _run_data(["data", "cpt", "--out", str(tmp_path / "c2"), "--n", "2", "--task", "dance"])
