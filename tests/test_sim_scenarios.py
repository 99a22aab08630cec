"""The stored scenario set: coverage, splits by seed and by template, consistency with the scene."""

from collections import Counter

from sim import catalog
from sim.scenarios import generate, generate_all, get_scenario, load_scenarios
from sim.spec import TABLE, PredicateType, ScenarioCategory, Split, Trigger, TurnRole, dumps, loads
from sim.templates import TEMPLATES, Intent, fill, split_of


def test_stored_set_is_up_to_date_with_the_generator():
    assert list(load_scenarios()) == generate_all(), "run `python -m sim.scenarios --write`"


def test_at_least_300_scenarios_covering_every_category_in_every_split():
    all_sc = load_scenarios()
    assert len(all_sc) >= 300
    per = Counter((s.category, s.split) for s in all_sc)
    for cat in ScenarioCategory:
        for split in Split:
            assert per[(cat, split)] >= 5, (cat, split)
    assert {s.split for s in load_scenarios("test")} == {Split.TEST}
    assert {s.category for s in load_scenarios("validation", "chat")} == {ScenarioCategory.CHAT}
    assert get_scenario("chat-test-000").category is ScenarioCategory.CHAT


def test_splits_are_disjoint_by_seed_and_by_template():
    by_split = {sp: load_scenarios(sp) for sp in Split}
    seeds = {sp: {s.seed for s in scs} for sp, scs in by_split.items()}
    assert not seeds[Split.TRAIN] & seeds[Split.TEST]
    assert not seeds[Split.TRAIN] & seeds[Split.VALIDATION]
    assert not seeds[Split.VALIDATION] & seeds[Split.TEST]
    templates = {sp: {t.template for s in scs for t in s.turns} for sp, scs in by_split.items()}
    assert not templates[Split.TRAIN] & templates[Split.TEST]
    assert not templates[Split.TRAIN] & templates[Split.VALIDATION]
    assert not templates[Split.VALIDATION] & templates[Split.TEST]
    for sp, scs in by_split.items():
        for s in scs:
            for t in s.turns:
                intent, index = t.template.split("/")
                assert split_of(Intent(intent), int(index)) is sp


def test_every_intent_has_templates_for_every_split():
    for intent, texts in TEMPLATES.items():
        assert len(texts) >= 4, intent
        assert {split_of(intent, i) for i in range(len(texts))} == set(Split)


def test_turn_texts_are_their_template_filled_with_their_slots():
    for s in load_scenarios("test"):
        for t in s.turns:
            intent, index = t.template.split("/")
            assert fill(Intent(intent), int(index), t.slots) == t.text


def test_scenes_and_predicates_are_consistent():
    receptacles = set(catalog.RECEPTACLES)
    for s in load_scenarios():
        names = [o.name for o in s.scene.objects]
        assert len(names) == len(set(names)), s.id
        assert len(names) <= 15
        for o in s.scene.objects:
            assert catalog.object_name(o.kind, o.colour) == o.name
        for p in s.predicates:
            if p.object is not None:
                assert p.object in names, (s.id, p)
            if p.type is PredicateType.AT:
                assert p.location in receptacles | {TABLE}
            if p.turn is not None:
                assert 0 <= p.turn < len(s.turns)
        assert s.turns[0].trigger is Trigger.START
        assert s.turns[-1].role is TurnRole.CLOSING
        for t in s.turns:
            if t.trigger in (Trigger.ON_APPROACH, Trigger.ON_HOLD):
                assert t.object in names


def test_categories_set_up_what_they_claim():
    for s in load_scenarios():
        names = {o.name: o for o in s.scene.objects}
        roles = [t.role for t in s.turns]
        if s.category is ScenarioCategory.MULTI_STAGE:
            moves = [p for p in s.predicates if p.type is PredicateType.AT and p.location != TABLE]
            assert len(moves) >= 10, s.id
        if s.category is ScenarioCategory.AMBIGUOUS:
            kind = s.turns[0].slots["kind"]
            assert sum(o.kind == kind for o in names.values()) >= 2
            assert TurnRole.AMBIGUOUS in roles
        if s.category is ScenarioCategory.INTERRUPTED:
            assert s.turns[1].role is TurnRole.INTERRUPT
            assert s.turns[1].trigger in (Trigger.ON_APPROACH, Trigger.ON_HOLD)
        if s.category is ScenarioCategory.INVALID:
            assert s.turns[0].role is TurnRole.INVALID
            if s.variant == "nonexistent":
                assert s.turns[0].slots["thing"] not in names
        if s.category is ScenarioCategory.FAILURE_RETRY:
            assert s.failures and s.failures[0].object in names
        if s.category is ScenarioCategory.PROACTIVE:
            assert any(p.type is PredicateType.OFFERED for p in s.predicates)
        if s.category is ScenarioCategory.CHAT:
            assert TurnRole.CHAT in roles
        if s.category is ScenarioCategory.TASK_COMPLETE:
            assert any(p.type is PredicateType.SAID_DONE for p in s.predicates)


def test_open_ended_answers_follow_the_attribute_table():
    K = catalog.KINDS
    for s in load_scenarios(category="open_ended"):
        kinds = {o.name: K[o.kind] for o in s.scene.objects}
        at = {p.object: p.location for p in s.predicates if p.type is PredicateType.AT}
        if s.variant == "least_sugar":
            drinks = [n for n, k in kinds.items() if k.category is catalog.Category.DRINK]
            keep = min(drinks, key=lambda n: kinds[n].sugar_g)
            assert at[keep] == TABLE and all(at[d] == "trash bin" for d in drinks if d != keep)
        if s.variant == "nut_allergy":
            assert all(at[n] == "trash bin" for n, k in kinds.items() if k.nuts)


def test_generation_is_deterministic_and_round_trips_through_json():
    a = generate("interrupted", "test", 3)
    assert a == generate("interrupted", "test", 3)
    assert loads(dumps(a)) == a
    assert generate("interrupted", "test", 4) != a
