"""Measurements that chose robix-tiny's tokenizer size and architecture (docs/robix_tiny.md).

Two commands, both CPU-only and bounded; run them under the shared CPU lock::

    flock /work/cpu.lock python -m training.probe_arch tokens --episodes 120
    flock /work/cpu.lock python -m training.probe_arch arch --variant cnn96 --budget-s 300

``tokens``: runs the simulator's oracle through scenarios of every category (train split for
training the tokenizer, test split for measuring), writes each episode exactly as the planner
prompts the model (``format.build_prompt`` + the answers, through ``format.to_hf_messages`` and
robix-tiny's chat template), trains byte-level BPE tokenizers of several sizes on the train
episodes and prints tokens per system prompt, user turn, answer and whole episode on the test
episodes.

``arch``: trains one architecture variant from scratch for ``--budget-s`` seconds on a proxy of
the real task rendered on the fly with ``sim.render`` (a fresh scene for every example, never a
fixed set), a third each: "Which objects are on the table, from left to right?" (1-3 objects),
"How many objects are on the table?" (1-4) and "Is the X in the Y?" (2-4 objects, some already
put away), through the real processor and chat template, loss on the answer only. Batch 32,
AdamW, warm-up then cosine decay, gradient clipping at 1.0. Every ``--eval-every-s`` it reports,
per question type on 192 held-out scenes, teacher-forced: exact match (every answer token and
the end token are the argmax, which is the same as greedy decoding producing exactly the
answer), token accuracy and loss, the token accuracy with the images shuffled within the batch
(the blind baseline: the gap is what the model reads from the image), and the vision feature
statistics (:func:`robix_planner.models.feature_stats`). One JSON line per evaluation goes to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Architecture variants compared by ``arch`` (build_model keys). The text model is the same in all.
VARIANTS: dict[str, dict] = {
    # 4 stride-2 convs on 96x128 -> 6x8 = 48 visual tokens
    "cnn96": {"image_size": [96, 128], "vision_encoder": "cnn", "vision_grid": [6, 8]},
    # the camera's own 120x160 (no resize) -> 8x10 map pooled to 6x8 = 48 tokens
    "cnn120": {"image_size": [120, 160], "vision_encoder": "cnn", "vision_grid": [6, 8]},
    # no conv stack: one linear map per 16x16 patch, 6x8 = 48 tokens (ViT-style stem)
    "patch96": {"image_size": [96, 128], "vision_encoder": "patch", "vision_grid": [6, 8]},
    # 4 convs on 96x128 pooled to 3x4 = 12 tokens (4x fewer tokens per image in long episodes)
    "cnn96g12": {"image_size": [96, 128], "vision_encoder": "cnn", "vision_grid": [3, 4]},
    # the default encoder with a smaller text model (192 wide, 3 layers)
    "cnn96small": {"image_size": [96, 128], "vision_encoder": "cnn", "vision_grid": [6, 8], "hidden_size": 192,
                   "num_layers": 3, "num_heads": 3, "num_kv_heads": 1, "intermediate_size": 576},
}


# ---------------------------------------------------------------------------------- episodes


def record_episode(scenario, render: bool = True):
    """Run the oracle through ``scenario``; return (capabilities, steps) with steps as format.Step."""
    from robix_planner import format as fmt
    from robix_planner.backends.base import ImagePart
    from sim.oracle import OraclePlanner
    from sim.runner import EpisodeRunner, RunnerConfig

    runner = EpisodeRunner(scenario, RunnerConfig(render=render))
    oracle = OraclePlanner(runner.privileged)
    steps: list = []
    caps_seen: list = []
    state = {"running": None, "holding": fmt.EMPTY}

    class Recorder:
        needs_images = render

        def decide(self, obs):
            caps_seen.append(obs.capabilities)
            outcomes = []
            for st in obs.statuses:
                if st.state.terminal:
                    text = state["running"] if state["running"] else "stop"
                    outcomes.append(fmt.Outcome(text, st.state.value, st.detail))
                    state["running"] = None
                    state["holding"] = st.holding or fmt.EMPTY
            images = tuple(ImagePart(img, camera=name) for name, img in obs.images.items())
            step_in = fmt.StepInput(
                utterances=(obs.utterance,) if obs.utterance else (),
                outcomes=tuple(outcomes),
                running=state["running"],
                holding=state["holding"],
                images=images,
            )
            d = oracle.decide(obs)
            if d.plan and d.plan != "stop":
                state["running"] = d.plan
            steps.append(fmt.Step(step_in, fmt.ModelOutput(d.thought, d.plan, d.reply)))
            return d

    runner.run(Recorder())
    return caps_seen[0], steps


def episode_messages(caps, steps):
    """The whole episode as transformers chat messages + its images (the SFT row format)."""
    from robix_planner import format as fmt

    prompt = fmt.build_prompt(caps, steps[:-1], steps[-1].input)
    prompt.append(fmt.assistant_turn(steps[-1].output))
    return fmt.to_hf_messages(prompt)


def _episodes(split: str, n: int, render: bool):
    from tqdm import tqdm

    from sim.scenarios import load_scenarios

    scenarios = load_scenarios(split)
    # Round-robin over categories so every kind of episode is in the sample.
    by_cat: dict = {}
    for s in scenarios:
        by_cat.setdefault(s.category, []).append(s)
    picked, i = [], 0
    while len(picked) < min(n, len(scenarios)):
        for cat in list(by_cat):
            if i < len(by_cat[cat]) and len(picked) < n:
                picked.append(by_cat[cat][i])
        i += 1
    return [episode_messages(*record_episode(s, render)) for s in tqdm(picked, desc=f"{split} episodes")]


def _texts(messages) -> list[str]:
    return [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]


def cmd_tokens(args) -> int:
    import statistics

    from robix_planner.models import build_tokenizer
    from robix_planner.models.robix_tiny.tokenizer import CHAT_TEMPLATE

    train = _episodes("train", args.episodes, render=True)
    test = _episodes("test", args.test_episodes, render=True)
    corpus = [t for msgs, _ in train for t in _texts(msgs)]
    log.info("corpus: %d texts, %d characters", len(corpus), sum(map(len, corpus)))
    rows = []
    for vocab in args.vocab:
        tok = build_tokenizer(corpus, vocab)
        sys_t, user_t, asst_t, ep_t, ep_img, chars = [], [], [], [], [], []
        for msgs, images in test:
            text = tok.apply_chat_template(msgs, tokenize=False, chat_template=CHAT_TEMPLATE)
            n_text = len(tok.encode(text, add_special_tokens=False))
            ep_t.append(n_text)
            ep_img.append(len(images))
            chars.append(len(text))
            for m in msgs:
                n = sum(len(tok.encode(t, add_special_tokens=False)) for t in _texts([m])) + 1
                {"system": sys_t, "user": user_t, "assistant": asst_t}[m["role"]].append(n)
        rows.append({
            "vocab": len(tok),
            "system": statistics.mean(sys_t),
            "user_turn": statistics.mean(user_t),
            "answer": statistics.mean(asst_t),
            "episode_text": statistics.mean(ep_t),
            "episode_text_max": max(ep_t),
            "images_mean": statistics.mean(ep_img),
            "images_max": max(ep_img),
            "chars_per_token": sum(chars) / sum(ep_t),
        })
    print(f"train episodes {len(train)}, test episodes {len(test)} (tokens per test episode, text only; "
          "add visual tokens per image x images)")
    print("| vocab | system prompt | user turn | answer | episode text (mean / max) | images (mean / max) | chars/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} | {r['system']:.0f} | {r['user_turn']:.1f} | {r['answer']:.1f} | "
              f"{r['episode_text']:.0f} / {r['episode_text_max']} | {r['images_mean']:.1f} / {r['images_max']} | "
              f"{r['chars_per_token']:.2f} |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


# ---------------------------------------------------------------------------------- the proxy task

QUESTION_SCENE = "Which objects are on the table, from left to right?"
QUESTION_COUNT = "How many objects are on the table?"
NUMBERS = ("none", "one", "two", "three", "four", "five")
KINDS = ("scene", "count", "status")


class ProxyTask:
    """Scenes and questions rendered on the fly from one seeded generator."""

    def __init__(self, seed: int, size=(160, 120)):
        import numpy as np

        from sim import catalog
        from sim.render import Renderer

        self.rng = np.random.default_rng(seed)
        self.renderer = Renderer(*size)
        self.catalog = catalog
        self.kinds = list(catalog.KINDS.values())

    def _objects(self, n: int):
        from sim.spec import SceneObject
        from sim.world import SLOTS_CM

        rng, cat = self.rng, self.catalog
        cols = rng.choice(5, size=n, replace=False)  # one object per column: left-to-right is unambiguous
        objs, names = [], set()
        for c in cols:
            while True:
                kind = self.kinds[rng.integers(len(self.kinds))]
                colour = kind.colours[rng.integers(len(kind.colours))]
                name = cat.object_name(kind.name, colour)
                if name not in names:
                    break
            names.add(name)
            x, y = SLOTS_CM[int(c) + 5 * int(rng.integers(3))]
            objs.append(SceneObject(name=name, kind=kind.name, colour=colour, x_cm=x, y_cm=y))
        return objs

    def example(self, kind: str):
        """(PIL image, question, answer) of type "scene", "count" or "status"."""
        from PIL import Image

        from sim.spec import Scene
        from sim.world import World

        rng, cat = self.rng, self.catalog
        if kind in ("scene", "count"):
            objs = self._objects(int(rng.integers(1, 4 if kind == "scene" else 5)))
            world = World(Scene(objects=objs, receptacles=list(cat.RECEPTACLES)))
            image = Image.fromarray(self.renderer.render(world))
            if kind == "count":
                return image, QUESTION_COUNT, NUMBERS[len(objs)]
            names = [o.name for o in sorted(objs, key=lambda o: o.x_cm)]
            return image, QUESTION_SCENE, ", ".join(names)
        objs = self._objects(int(rng.integers(2, 5)))
        world = World(Scene(objects=objs, receptacles=list(cat.RECEPTACLES)))
        put = rng.choice(len(objs), size=int(rng.integers(1, len(objs))), replace=False)
        where = {}
        for i in put:
            rec = cat.RECEPTACLES[rng.integers(3)]
            world.grasp(objs[i].name)
            world.release_into(objs[i].name, rec)
            where[objs[i].name] = rec
        if rng.random() < 0.5 and where:  # a yes question
            name = list(where)[rng.integers(len(where))]
            rec, answer = where[name], "yes"
        else:
            name = objs[rng.integers(len(objs))].name
            others = [r for r in cat.RECEPTACLES if r != where.get(name)]
            rec, answer = others[rng.integers(len(others))], "no"
        return Image.fromarray(self.renderer.render(world)), f"Is the {name} in the {rec}?", answer


def _probe_texts() -> list[str]:
    from sim import catalog

    names = [catalog.object_name(k.name, c) for k in catalog.KINDS.values() for c in k.colours]
    texts = [QUESTION_SCENE, QUESTION_COUNT, "yes", "no", *NUMBERS] + [", ".join(names[i:i + 3]) for i in range(len(names))]
    texts += [f"Is the {n} in the {r}?" for n in names for r in catalog.RECEPTACLES]
    return texts


def _batch(task, processor, n: int, kinds=None):
    kinds = kinds or [KINDS[i % 3] for i in range(n)]
    ex = [task.example(k) for k in kinds]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
             {"role": "assistant", "content": [{"type": "text", "text": a}]}] for _, q, a in ex]
    out = processor.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
        processor_kwargs={"images": [[img] for img, _, _ in ex], "padding": True},
    )
    labels = out["input_ids"].clone()
    labels[out["assistant_masks"] == 0] = -100
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
            "pixel_values": out["pixel_values"], "labels": labels}, kinds


def _scores(model, batch, shuffle: bool = False):
    """Per example: (exact, token accuracy, loss) on the answer tokens, teacher-forced.

    ``shuffle``: the images rolled by one within the batch (each question sees another scene), the
    blind baseline; what the model gains over it is what it reads from the image.
    """
    import torch

    pv = batch["pixel_values"].roll(1, dims=0) if shuffle else batch["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pv).logits
    logits, tgt = logits[:, :-1].float(), batch["labels"][:, 1:]
    mask = tgt != -100
    hit = (logits.argmax(-1) == tgt) & mask
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none") * mask
    n = mask.sum(-1)
    exact = (hit.sum(-1) == n).tolist()
    return list(zip(exact, (hit.sum(-1) / n).tolist(), (nll.sum(-1) / n).tolist()))


def cmd_arch(args) -> int:
    import numpy as np
    import torch

    from robix_planner.models import build_model, build_processor, build_tokenizer, count_parameters, feature_stats

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variant = dict(VARIANTS[args.variant])
    tok = build_tokenizer(_probe_texts(), 512, min_frequency=1)
    model = build_model({**variant, "seed": args.seed}, tok)
    processor = build_processor(tok, model.config)
    n_params = count_parameters(model)
    size = variant["image_size"]
    task = ProxyTask(args.seed)
    eval_task = ProxyTask(10_000 + args.seed)
    eval_kinds = list(KINDS) * (args.eval_n // 3)
    eval_batches = [_batch(eval_task, processor, 32, eval_kinds[i:i + 32])
                    for i in range(0, len(eval_kinds), 32)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    log.info("%s: %s, %.2fM parameters, %d visual tokens", args.variant, variant, n_params / 1e6,
             model.config.image_seq_length)
    out = open(args.out, "a") if args.out else None
    t_start = time.perf_counter()
    t_train = 0.0  # seconds spent in training steps (data + forward + backward), not in evaluation
    step, ema, total_steps = 0, None, None
    next_eval = args.eval_every_s
    warmup = args.warmup

    def evaluate():
        model.eval()
        res = {k: [] for k in KINDS}
        blind = {k: [] for k in KINDS}
        for b, kinds in eval_batches:
            for k, r, rb in zip(kinds, _scores(model, b), _scores(model, b, shuffle=True)):
                res[k].append(r)
                blind[k].append(rb)
        stats = feature_stats(model, eval_batches[0][0]["pixel_values"])
        model.train()
        rec = {"variant": args.variant, "step": step, "train_s": round(t_train, 1),
               "steps_per_s": round(step / max(t_train, 1e-9), 2), "train_loss": round(ema, 4) if ema else None}
        for k in KINDS:
            r, rb = np.array(res[k]), np.array(blind[k])
            rec[f"{k}_exact"] = round(float(r[:, 0].mean()), 3)
            rec[f"{k}_tok"] = round(float(r[:, 1].mean()), 3)
            rec[f"{k}_loss"] = round(float(r[:, 2].mean()), 3)
            rec[f"{k}_tok_blind"] = round(float(rb[:, 1].mean()), 3)
        rec.update(token_rel=round(stats["token_rel"], 3), image_rel=round(stats["image_rel"], 3),
                   params_m=round(n_params / 1e6, 2), visual_tokens=model.config.image_seq_length, image_size=size)
        print(json.dumps(rec), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        return rec

    model.train()
    rec = evaluate()
    while t_train < args.budget_s:
        t0 = time.perf_counter()
        batch, _ = _batch(task, processor, args.batch)
        if total_steps is None and step == 10:  # plan the cosine schedule from the measured speed
            total_steps = max(warmup + 10, int(args.budget_s / (t_train / step)))
        horizon = total_steps or 10**9
        if step < warmup:
            lr = args.lr * (step + 1) / warmup
        else:
            frac = min(1.0, (step - warmup) / max(1, horizon - warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = float(loss.detach()) if ema is None else 0.95 * ema + 0.05 * float(loss.detach())
        t_train += time.perf_counter() - t0
        if t_train >= next_eval:
            rec = evaluate()
            next_eval += args.eval_every_s
    if rec["step"] != step:
        rec = evaluate()
    log.info("done in %.0f s wall", time.perf_counter() - t_start)
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.probe_arch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens", help="tokens per prompt for several tokenizer sizes, on real episodes")
    t.add_argument("--episodes", type=int, default=120, help="train-split episodes to train the tokenizers on")
    t.add_argument("--test-episodes", type=int, default=60, help="test-split episodes to measure on")
    t.add_argument("--vocab", type=int, nargs="+", default=[1024, 2048, 4096])
    t.add_argument("--out", help="write one JSON line per tokenizer here")
    t.set_defaults(func=cmd_tokens)
    a = sub.add_parser("arch", help="train one architecture variant on the rendered proxy task")
    a.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    a.add_argument("--budget-s", type=float, default=300.0, help="seconds of training (evaluation not counted)")
    a.add_argument("--eval-every-s", type=float, default=60.0)
    a.add_argument("--eval-n", type=int, default=192)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--warmup", type=int, default=50)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", help="append one JSON line per evaluation here")
    a.set_defaults(func=cmd_arch)
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
