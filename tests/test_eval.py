"""``robix eval online``: the oracle scores the same over the bus and in process; the CLI's table and JSON."""

from __future__ import annotations

import json

import pytest

from robix_planner.cli import main, make_parser
from sim.eval import format_table, run_bus, run_inprocess, select, summarize
from sim.scenarios import load_scenarios

SAME = ("progress", "success", "checks", "repeats", "commands", "truncated", "failed")


def test_the_oracle_scores_the_same_over_the_bus_and_in_process(bus_config):
    # Two scenarios of every category, plus the other interrupt variants (do X first, stop; before/after the grasp).
    scenarios = select("test", limit=2) + load_scenarios("test", "interrupted")[2:6]
    inproc = run_inprocess(scenarios)
    bus = run_bus(scenarios, planner="oracle", time_scale=30, bus_config=bus_config)
    assert [r.id for r in bus] == [r.id for r in inproc] == [s.id for s in scenarios]
    for a, b in zip(inproc, bus):
        assert a.progress == 1.0 and a.success, a
        assert {k: getattr(b, k) for k in SAME} == {k: getattr(a, k) for k in SAME}, a.id
        # Over the bus two triggers coalesce or not depending on when the second arrives (an utterance
        # landing while a decision runs makes one more): the count may differ by one, never more.
        assert abs(b.decisions - a.decisions) <= 1, (a.id, a.decisions, b.decisions)
    sa, sb = summarize(inproc), summarize(bus)
    assert list(sa) == list(sb) and len(sa) == 11  # ten categories and "all"
    for cat in sa:
        assert (sa[cat].progress, sa[cat].success, sa[cat].checks) == \
               (sb[cat].progress, sb[cat].success, sb[cat].checks)


def test_eval_is_a_robix_subcommand_through_the_entry_point():
    parser = make_parser()
    args = parser.parse_args(["eval", "online", "--planner", "oracle", "--split", "test", "--mode", "bus"])
    assert args.func.__module__ == "sim.eval"


@pytest.mark.parametrize("mode", ["inprocess", "bus"])
def test_eval_online_prints_a_table_per_category_and_writes_json(mode, tmp_path, bus_env, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "online", "--planner", "oracle", "--split", "test", "--mode", mode, "--category", "chat",
               "--category", "invalid", "--limit", "2", "--time-scale", "40", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("category"))
    for col in ("progress", "success", "interrupt honoured", "asked when ambiguous", "refused when invalid",
                "repeats", "decisions", "sim s"):
        assert col in lines[header]
    rows = {ln.split()[0]: ln.split() for ln in lines[header + 2:] if ln and not ln.startswith(("-", "wrote"))}
    assert set(rows) == {"chat", "invalid", "all"}
    assert rows["chat"][1:4] == ["2", "100.0%", "100.0%"] and rows["invalid"][6] == "2/2"
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == mode and data["meta"]["episodes"] == 4
    ids = [e["id"] for e in data["episodes"]]
    assert ids == ["chat-test-000", "chat-test-001", "invalid-test-000", "invalid-test-001"]
    assert data["summary"]["all"]["progress"] == 1.0
    assert data["summary"]["invalid"]["checks"]["refused_when_invalid"] == [2, 2]


def test_eval_online_says_what_to_change(capsys):
    assert main(["eval", "online", "--planner", "external", "--mode", "inprocess"]) == 2
    assert "use --mode bus" in capsys.readouterr().err


def test_a_missing_external_planner_ends_with_a_clear_message(bus_env, capsys):
    rc = main(["eval", "online", "--planner", "external", "--category", "chat", "--limit", "1",
               "--ready-timeout-s", "0.3"])
    assert rc == 1
    assert "did not connect within 0.3 s (is the planner running, in the same bus domain?)" in capsys.readouterr().err


def test_table_marks_checks_that_do_not_apply():
    recs = run_inprocess(select("test", ["chat"], 1))
    table = format_table(summarize(recs))
    assert " - " in table and "100.0%" in table
