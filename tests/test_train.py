"""The training pipelines (``robix train``) on a tiny Qwen2.5-VL built from config and hand-made datasets.

The datasets follow the issue-5 schema exactly: episodes are built with
``format.build_prompt`` + ``format.to_hf_messages``, per-step rows are the episode cut after
each user turn. The 2-process tests run each stage under ``accelerate launch --cpu`` and
check that the loss fell (the reward rose, for RL) and that every trainable parameter changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from robix_planner import format as fmt
from robix_planner import skills
from robix_planner.backends.base import ImagePart
from robix_planner.config import ConfigError
from robix_planner.messages import Capabilities

REPO = Path(__file__).resolve().parents[1]

CAPS = Capabilities(robot="arm", skills=list(skills.TABLETOP_SKILLS), objects=["red cup", "fork", "banana"],
                    receptacles=["bus tub", "trash bin"])

#: The tiny model's chat template with {% generation %} markers (assistant-only loss).
_CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for content in message['content'] %}"
            "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
            "{% endfor %}{% endif %}")
TRAIN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                  "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "<|im_end|>{% endgeneration %}"
                  "{% else %}" + _CONTENT + "<|im_end|>{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# --------------------------------------------------------------------------- hand-made data


def _pixels(color: int, shift: int = 0) -> np.ndarray:
    a = np.full((48, 48, 3), 30, np.uint8)
    a[8 + shift:24 + shift, 8:24, color % 3] = 220
    return a


def _step(utter=(), outcomes=(), holding=None, color=0):
    return fmt.StepInput(utterances=tuple(utter), outcomes=tuple(outcomes), holding=holding,
                         images=(ImagePart(_pixels(color)),))


RED, FORK = "put the red cup into the bus tub", "put the fork into the bus tub"

#: Episodes: (category, [(StepInput, ModelOutput, acceptable plans, kind), ...]).
EPISODES = [
    ("multi-stage", [
        (_step(["clear the table"], color=0),
         fmt.ModelOutput("I see a red cup and a fork. Next: put the red cup into the bus tub.", RED,
                         "Sure, I'll clear the table."), [RED, FORK], "act"),
        (_step(outcomes=[fmt.Outcome(RED, "succeeded")], holding="", color=1),
         fmt.ModelOutput("'put the red cup into the bus tub' succeeded. Next: put the fork into the bus tub.", FORK),
         [FORK], "act"),
        (_step(outcomes=[fmt.Outcome(FORK, "succeeded")], holding="", color=2),
         fmt.ModelOutput("The task is complete; I say so and ask if anything else is needed.", None,
                         "All done. Is there anything else I can help with?"), [""], "done"),
    ]),
    ("invalid", [
        (_step(["put the laptop into the bus tub"], color=1),
         fmt.ModelOutput("There is no laptop here; I refuse and do not move.", None,
                         "Sorry, I don't see a laptop on the table."), [""], "refuse"),
        (_step(["thanks, how are you?"], color=1),
         fmt.ModelOutput("Small talk, so I just answer.", None, "I'm fine, thanks!"), [""], "chat"),
    ]),
]


#: A step the SFT data answers both ways (half the episodes put the red cup away first, half the banana):
#: the SFT model is undecided, the RL rows accept only the red cup, so GRPO has a clear signal to learn.
CHOICE_INPUT = _step(["please tidy up"], color=2)
CHOICE_A = fmt.ModelOutput("I see a red cup and a banana. Next: put the red cup into the bus tub.", RED, "Sure.")
CHOICE_B = fmt.ModelOutput("I see a red cup and a banana. Next: put the banana into the trash bin.",
                           "put the banana into the trash bin", "Sure.")
SFT_EPISODES = EPISODES + [("choice", [(CHOICE_INPUT, CHOICE_A, [RED], "act")]),
                           ("choice", [(CHOICE_INPUT, CHOICE_B, [RED], "act")])]
RL_EPISODES = EPISODES + [("choice", [(CHOICE_INPUT, CHOICE_A, [RED], "act")])]


def _pil(parts):
    from PIL import Image

    return [Image.fromarray(p.pixels) for p in parts]


def episode_rows(episodes=EPISODES) -> dict:
    """SFT rows (one per episode), exactly as build_prompt + to_hf_messages produce them."""
    rows = {k: [] for k in ("messages", "images", "scenario_id", "category", "split", "acceptable", "kind")}
    for n, (category, steps) in enumerate(episodes):
        history = [fmt.Step(s, o) for s, o, _, _ in steps[:-1]]
        prompt = fmt.build_prompt(CAPS, history, steps[-1][0]) + [fmt.assistant_turn(steps[-1][1])]
        messages, images = fmt.to_hf_messages(prompt)
        rows["messages"].append(messages)
        rows["images"].append(_pil(images))
        rows["scenario_id"].append(f"ep{n}")
        rows["category"].append(category)
        rows["split"].append("train")
        rows["acceptable"].append([list(a) for _, _, a, _ in steps])
        rows["kind"].append([k for _, _, _, k in steps])
    return rows


def step_rows(episodes=EPISODES) -> dict:
    """Per-step rows (trl prompt-completion format): the prompt up to user turn k, the assistant turn k."""
    rows = {k: [] for k in ("prompt", "completion", "images", "acceptable", "kind", "category", "scenario_id",
                            "step")}
    for n, (category, steps) in enumerate(episodes):
        for k, (s, o, acceptable, kind) in enumerate(steps):
            history = [fmt.Step(si, oi) for si, oi, _, _ in steps[:k]]
            messages, images = fmt.to_hf_messages(fmt.build_prompt(CAPS, history, s))
            completion, _ = fmt.to_hf_messages([fmt.assistant_turn(o)])
            rows["prompt"].append(messages)
            rows["completion"].append(completion)
            rows["images"].append(_pil(images))
            rows["acceptable"].append(list(acceptable))
            rows["kind"].append(kind)
            rows["category"].append(category)
            rows["scenario_id"].append(f"ep{n}")
            rows["step"].append(k)
    return rows


def cpt_rows() -> dict:
    """CPT rows: image questions and text-only rows."""
    colors = ["red", "green", "blue"]
    rows = {"messages": [], "images": [], "task": []}
    from PIL import Image

    for i in range(6):
        c = i % 3
        rows["messages"].append([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is the square?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": colors[c]}]},
        ])
        rows["images"].append([Image.fromarray(_pixels(c, shift=i % 2))])
        rows["task"].append("grounding")
    for q, a in [("Where does a cup go?", "into the bus tub"), ("Where does a napkin go?", "into the trash bin")]:
        rows["messages"].append([{"role": "user", "content": [{"type": "text", "text": q}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": a}]}])
        rows["images"].append([])
        rows["task"].append("text")
    return rows


def save_dataset(rows: dict, path: Path, repeat: int = 1) -> Path:
    import datasets

    rows = {k: v * repeat for k, v in rows.items()}
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny Qwen2.5-VL, its training chat template and the three datasets."""
    from helpers_tiny_vlm import build_tiny_qwen_vl

    root = tmp_path_factory.mktemp("train")
    build_tiny_qwen_vl(root / "qwen")
    (root / "train.jinja").write_text(TRAIN_TEMPLATE)
    save_dataset(cpt_rows(), root / "cpt_data", repeat=2)
    save_dataset(episode_rows(SFT_EPISODES), root / "sft_data", repeat=3)
    save_dataset(step_rows(RL_EPISODES), root / "rl_data")
    return root


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(stage: str, config: Path, *overrides: str, processes: int = 2, timeout_s: float = 240) -> str:
    """``accelerate launch`` a stage with ``processes`` CPU processes (1 thread each); returns its stdout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training/accelerate/cpu2.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(port), "-m", "robix_planner.cli", "train", stage, "--config", str(config),
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def unchanged(before: dict, after: dict) -> list[str]:
    import torch

    assert set(before) == set(after)
    return [k for k in before if torch.equal(before[k], after[k])]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(output_dir / "loss.jsonl") if "loss" in r]


# --------------------------------------------------------------------------- configs (no torch)


def test_stage_config_is_strict_and_takes_overrides(tmp_path):
    from training.train import load_config

    f = write_config(tmp_path / "sft.yaml", {"model": "m", "output_dir": "o", "data": {"path": "d"},
                                            "train": {"max_steps": 5}})
    cfg = load_config("sft", str(f), ["train.lr=0.001", "lora.r=4"])
    assert cfg.train.max_steps == 5 and cfg.train.lr == 0.001 and cfg.lora.r == 4 and cfg.loss == "assistant"
    with pytest.raises(ConfigError, match="max_stpes"):
        load_config("sft", str(f), ["train.max_stpes=3"])
    with pytest.raises(ConfigError, match="loss="):
        load_config("sft", str(f), ["loss=everything"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config("cpt", str(write_config(tmp_path / "x.yaml", {"model": "m"})))
    with pytest.raises(ConfigError, match="num_generations"):
        load_config("rl", str(f), ["num_generations=1"])
    with pytest.raises(ConfigError, match="judge_model"):
        load_config("rl", str(f), ["rewards.judge=1.0"])


def test_data_sources_fail_with_what_to_change(tmp_path):
    from training.train import DataConfig, load_rows

    with pytest.raises(ConfigError, match="builder='nope'"):
        load_rows(DataConfig(build={"builder": "nope"}))
    with pytest.raises(ConfigError, match="is not a directory"):
        load_rows(DataConfig(path=str(tmp_path / "missing")))
    save_dataset(cpt_rows(), tmp_path / "cpt")
    assert len(load_rows(DataConfig(path=str(tmp_path / "cpt"), split=None, limit=3))) == 3
    with pytest.raises(ConfigError, match="lacks the column"):
        load_rows(DataConfig(path=str(tmp_path / "cpt"), split=None), need=("prompt", "acceptable"))


def test_all_config_includes_stage_files(tmp_path):
    from training.train import load_config

    write_config(tmp_path / "cpt.yaml", {"data": {"path": "c"}, "train": {"max_steps": 3}})
    f = write_config(tmp_path / "all.yaml", {"output_dir": "runs/x", "model": "m", "cpt": "cpt.yaml",
                                             "sft": {"data": {"path": "s"}}})
    cfg = load_config("all", str(f), ["cpt.train.max_steps=7"])
    assert cfg.cpt.train.max_steps == 7 and cfg.cpt.data.path == "c" and cfg.sft.data.path == "s"
    assert cfg.init is None and cfg.rl is None
    with pytest.raises(ConfigError, match="bogus"):
        load_config("all", str(f), ["cpt.bogus=1"])


def test_shipped_configs_load():
    from training.train import load_config

    configs = REPO / "training/configs"
    for name in ("init", "cpt", "sft", "rl", "all"):
        load_config(name, str(configs / f"{name}.yaml"))
    for f in sorted(configs.glob("tiny_*.yaml")):
        load_config(f.stem.split("_", 1)[1], str(f))


# --------------------------------------------------------------------------- 2-process stages


TRAIN = {"batch_size": 2, "lr": 0.003, "warmup": 1, "logging_steps": 1, "threads": 1, "seed": 0}


@pytest.fixture(scope="module")
def cpt_run(work):
    """CPT with LoRA (merged), 2 processes, checkpoints every step."""
    cfg = {"model": str(work / "qwen"), "output_dir": str(work / "cpt"), "chat_template": str(work / "train.jinja"),
           "data": {"path": str(work / "cpt_data"), "split": None}, "loss": "all",
           "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "save": "merged"},
           "train": {**TRAIN, "max_steps": 6, "save_steps": 1, "save_total_limit": None}}
    out = launch("cpt", write_config(work / "cpt.yaml", cfg))
    return work / "cpt", out


@pytest.fixture(scope="module")
def sft_run(work, cpt_run):
    """SFT of every weight on whole episodes (assistant-only loss), 2 processes, from the CPT model."""
    cfg = {"model": str(cpt_run[0] / "model"), "output_dir": str(work / "sft"),
           "data": {"path": str(work / "sft_data")},
           "train": {**TRAIN, "max_steps": 30, "save_steps": 15}}
    out = launch("sft", write_config(work / "sft.yaml", cfg))
    return work / "sft", out


RL_TEMPERATURE = 0.5


@pytest.fixture(scope="module")
def rl_run(work, sft_run):
    """Variance filter + GRPO of every weight, 2 processes, from the SFT model."""
    cfg = {"model": str(sft_run[0] / "model"), "output_dir": str(work / "rl"), "data": {"path": str(work / "rl_data")},
           "num_generations": 4, "max_completion_length": 160, "temperature": RL_TEMPERATURE,
           "filter": {"k": 4, "max_new_tokens": 160, "temperature": RL_TEMPERATURE},
           "train": {**TRAIN, "batch_size": 2, "lr": 0.0002, "max_steps": 12, "save_steps": 6}}
    out = launch("rl", write_config(work / "rl.yaml", cfg))
    return work / "rl", out


def completion_logprob(model, processor, row: dict, text: str) -> float:
    """log p(text + eos | the row's prompt and images) under ``model``."""
    import torch
    from trl.data_utils import prepare_multimodal_messages

    tok = processor.tokenizer
    messages = prepare_multimodal_messages(row["prompt"], images=list(row["images"]))
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    completion = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]])
    n = enc["input_ids"].shape[1]
    enc["input_ids"] = torch.cat([enc["input_ids"], completion], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    with torch.no_grad():
        logits = model.eval()(**enc).logits[0, n - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, completion[0][:, None]).sum().item()


def test_cpt_two_processes_lora_every_adapter_weight_changes(work, cpt_run):
    from safetensors.torch import load_file

    out, stdout = cpt_run
    loss = losses(out)
    assert len(loss) == 6 and loss[-1] < loss[0], loss
    first = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoint-6" / "adapter_model.safetensors"))
    assert first and all("lora_" in k for k in first)
    assert unchanged(first, last) == []  # every LoRA parameter moved after the first step
    # merged: a full model whose adapted weights differ from the input's, the others equal
    before, after = weights(work / "qwen"), weights(out / "model")
    moved = set(before) - set(unchanged(before, after))
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 6 and done["lora"] is True and "[cpt] done in" in stdout
    # Two processes shared every batch: 6 steps x 2 rows x 2 processes = 24 rows = 1.5 epochs of 16.
    assert done["processes"] == 2 and done["rows"] == 16
    assert read_log(out / "loss.jsonl")[-1]["epoch"] == pytest.approx(6 * 2 * 2 / 16)


def test_sft_two_processes_loss_falls_and_every_weight_changes(sft_run, cpt_run):
    out, stdout = sft_run
    assert json.loads((out / "done.json").read_text())["processes"] == 2
    loss = losses(out)
    assert loss[-1] < 0.5 * loss[0], loss
    assert unchanged(weights(cpt_run[0] / "model"), weights(out / "model")) == []
    assert (out / "checkpoint-30").is_dir() and (out / "model" / "chat_template.jinja").is_file()


def test_rl_two_processes_filter_then_grpo_prefers_the_acceptable_plan(work, rl_run, sft_run, torch_one_thread):
    import datasets

    from training.train import load_model, load_processor

    out, stdout = rl_run
    assert json.loads((out / "done.json").read_text())["processes"] == 2
    report = json.loads((out / "filter.json").read_text())
    candidates = datasets.load_from_disk(str(work / "rl_data"))
    assert report["candidates"] == len(candidates) and 0 < report["kept"] == report["candidates"] - report["all_equal"]
    assert f"variance filter: kept {report['kept']} of {len(candidates)} prompts" in stdout
    prompts = datasets.load_from_disk(str(out / "prompts"))
    assert len(prompts) == report["kept"] and "choice" in prompts["category"]  # the undecided step has variance
    assert unchanged(weights(sft_run[0] / "model"), weights(out / "model")) == []
    log = read_log(out / "loss.jsonl")
    assert any("rewards/action_reward/mean" in r for r in log)

    # GRPO moved probability from the unacceptable plan to the acceptable one on the undecided step.
    row = prompts[prompts["category"].index("choice")]
    margins = []
    for model_dir in (sft_run[0] / "model", out / "model"):
        model, processor = load_model(model_dir), load_processor(model_dir)
        good, bad = (completion_logprob(model, processor, row, fmt.serialize(o)) for o in (CHOICE_A, CHOICE_B))
        margins.append(good - bad)
    assert margins[1] > margins[0] + 0.5, margins


# --------------------------------------------------------------------------- in-process: resume, loading, all


def _sft_config(work, out: Path, **changes):
    from training.train import SFTStageConfig, convert

    cfg = {"model": str(work / "qwen"), "output_dir": str(out), "chat_template": str(work / "train.jinja"),
           "data": {"path": str(work / "sft_data"), "limit": 4},
           "train": {**TRAIN, "max_steps": 4, "save_steps": 2, "save_total_limit": None}}
    for key, value in changes.items():
        cfg[key] = value
    return convert(SFTStageConfig, cfg)


def test_resume_continues_from_the_last_checkpoint(work, tmp_path, torch_one_thread):
    import shutil

    from training.train import run_sft

    out = tmp_path / "sft"
    run_sft(_sft_config(work, out))
    full = weights(out / "model")
    # Interrupted after step 2: only checkpoint-2 survives.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "model")
    (out / "done.json").unlink()
    done = run_sft(_sft_config(work, out))
    assert done["resumed_from"] == "checkpoint-2" and done["steps"] == 4
    steps = [r["step"] for r in read_log(out / "loss.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    resumed = weights(out / "model")
    import torch

    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)
    with pytest.raises(ConfigError, match="resume=true"):
        run_sft(_sft_config(work, out, resume=False))


def test_checkpoint_and_lora_adapter_load_through_auto_classes(work, tmp_path, cpt_run, sft_run, torch_one_thread):
    import torch
    from transformers import AutoModelForImageTextToText

    from training.train import load_model, load_processor, run_sft

    # A full checkpoint (a trainer checkpoint and the stage's model) loads like any local model.
    for path in (cpt_run[0] / "model", sft_run[0] / "checkpoint-15"):
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"

    out = tmp_path / "adapter"
    run_sft(_sft_config(work, out, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                          "save": "adapter"}, train={**TRAIN, "max_steps": 2, "save_steps": 2}))
    adapter = out / "model"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == (work / "qwen").resolve()
    processor = load_processor(adapter)
    messages, images = fmt.to_hf_messages(fmt.build_prompt(CAPS, [], _step(["hello"])))
    from trl.data_utils import prepare_multimodal_messages

    inputs = processor.apply_chat_template(prepare_multimodal_messages(messages, images=_pil(images)),
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        auto = AutoModelForImageTextToText.from_pretrained(adapter, local_files_only=True)  # base + adapter
        merged = load_model(adapter)
        base = load_model(work / "qwen")
        logits = [m.eval()(**inputs).logits for m in (auto, merged, base)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[0], logits[2], atol=1e-4)

    with pytest.raises(ConfigError, match="itself a LoRA adapter"):
        run_sft(_sft_config(work, tmp_path / "again", model=str(adapter),
                            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"], "save": "adapter"}))


def test_all_chains_stages_and_skips_finished_ones(work, tmp_path, capsys, torch_one_thread):
    from training.train import AllConfig, convert, read_done, run_all

    stage = {"chat_template": str(work / "train.jinja"), "data": {"path": str(work / "sft_data"), "limit": 2},
             "train": {**TRAIN, "max_steps": 1, "save_steps": 1}}
    cfg = convert(AllConfig, {"output_dir": str(tmp_path / "run"), "model": str(work / "qwen"),
                              "cpt": {**stage, "loss": "all"}, "sft": stage})
    run_all(cfg)
    first = capsys.readouterr().out
    assert read_done(tmp_path / "run" / "cpt")["input"] == str(work / "qwen")
    assert read_done(tmp_path / "run" / "sft")["input"] == str(tmp_path / "run" / "cpt" / "model")
    assert "[cpt] done in" in first and "[sft] done in" in first and "total" in first
    run_all(cfg)
    again = capsys.readouterr().out
    assert "[cpt] already done" in again and "[sft] already done" in again


def test_completions_keep_format_tags_that_a_tokenizer_marks_special():
    """trl decodes completions with skip_special_tokens=True; tags marked special would vanish and fail every
    format check, so the RL stage re-decodes them from the ids, keeping the tags and dropping eos/pad."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from training.rewards import format_reward
    from training.rl import completion_texts, keep_tags, tags_are_special

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["put the red cup into the bus tub"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_tokens([AddedToken(t, special=True, normalized=False) for t in fmt.TAGS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    text = fmt.serialize(fmt.ModelOutput("ok", "put the red cup into the bus tub"))
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
    assert tags_are_special(tok)
    assert "<|think_start|>" not in tok.decode(ids, skip_special_tokens=True)  # what trl would score
    assert completion_texts([ids], tok) == [text]
    assert completion_texts([ids + tok.encode("tail", add_special_tokens=False)], tok, {tok.eos_token_id}) == [text]
    stripped = [[{"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}]]
    assert format_reward([None], stripped) == [0.0]
    wrapped = keep_tags(format_reward, tok)
    assert wrapped.__name__ == "format_reward"
    assert wrapped([None], stripped, completion_ids=[ids]) == [1.0]


def test_init_builds_robix_tiny_that_sft_trains(work, tmp_path, torch_one_thread):
    pytest.importorskip("robix_planner.models")
    from transformers import AutoModelForImageTextToText

    from training.train import InitConfig, convert, run_init, run_sft

    arch = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
            "vision_channels": [8, 16, 32, 64]}
    done = run_init(convert(InitConfig, {"output_dir": str(tmp_path / "init"), "vocab_size": 512,
                                         "corpus": [str(work / "cpt_data"), str(work / "sft_data")],
                                         "architecture": arch}))
    assert done["vocab_size"] == 512 and done["texts"] > 0
    model_dir = tmp_path / "init" / "model"
    assert type(AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)).__name__.startswith(
        "RobixTiny")
    # robix-tiny's own chat template carries the {% generation %} markers: assistant-only loss as is.
    # Batched by length, as the shipped configs train (the sampler needs the length column kept).
    cfg = _sft_config(work, tmp_path / "sft", model=str(model_dir), chat_template=None,
                      train={**TRAIN, "max_steps": 6, "save_steps": 6},
                      trl={"train_sampling_strategy": "group_by_length"})
    done = run_sft(cfg)
    assert done["last_loss"] < done["first_loss"]
    assert unchanged(weights(model_dir), weights(tmp_path / "sft" / "model")) == []


def test_data_mix_appends_the_rows_of_other_sources_with_the_shared_columns(work):
    from training.train import DataConfig, convert, load_rows

    sft = load_rows(convert(DataConfig, {"path": str(work / "sft_data")}))
    cpt = load_rows(convert(DataConfig, {"path": str(work / "cpt_data"), "split": None}))
    mixed = load_rows(convert(DataConfig, {"path": str(work / "sft_data"),
                                           "mix": [{"path": str(work / "cpt_data"), "limit": 3}]}))
    assert len(mixed) == len(sft) + min(3, len(cpt))
    assert {"messages", "images"} <= set(mixed.column_names) <= set(sft.column_names) & set(cpt.column_names)
    assert mixed[len(sft)]["messages"] == cpt[0]["messages"]  # the mixed-in rows, in their order, at the end
    with pytest.raises(ConfigError, match=r"data.mix\[0\]"):
        load_rows(convert(DataConfig, {"path": str(work / "sft_data"), "mix": [{"pth": "x"}]}))


def test_length_column_orders_rows_as_their_token_counts(work):
    import datasets

    from training.train import add_length_column

    rows = datasets.load_from_disk(str(work / "sft_data"))
    rows = rows.select(range(min(len(rows), 8)))
    lengths = add_length_column(rows)["length"]
    texts = ["".join(training_texts(r)) for r in rows]
    assert len(set(lengths)) > 1
    # Longer conversations (more text and images) get larger lengths, in the same order.
    order = sorted(range(len(rows)), key=lambda i: (len(texts[i]) + 64 * len(rows[i]["images"])))
    assert [lengths[i] for i in order] == sorted(lengths)


def training_texts(row):
    from training.train import corpus_texts_of

    return list(corpus_texts_of(row))


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {f.stem: load_config_from_file(str(f)) for f in (REPO / "training/accelerate").glob("*.yaml")}
    # cpu2: the torchrun launcher (accelerate's MULTI_CPU needs mpirun); the stages join on CPU (gloo).
    assert {k: str(c.distributed_type).rsplit(".", 1)[-1] for k, c in kinds.items()} == {
        "cpu2": "MULTI_GPU", "multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}
    assert kinds["cpu2"].num_processes == 2 and kinds["cpu2"].use_cpu
    assert kinds["zero2"].deepspeed_config["zero_stage"] == 2 and kinds["zero3"].deepspeed_config["zero_stage"] == 3
