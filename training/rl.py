"""``robix train rl``: GRPO (trl GRPOTrainer) on per-step prompts, after Robix's variance filter.

The candidates are per-step rows (``training.data.episodes.explode_steps``: ``prompt``,
``completion``, ``images``, ``acceptable``, ``kind``, ...). Before RL each candidate prompt is
sampled ``filter.k`` times from the input (SFT) model and scored with the stage's rewards;
only prompts whose rewards are not all equal are kept: a group of equal rewards gives GRPO
no advantage, hence no gradient (Robix sampled 8 times). The kept prompts are saved in
``output_dir/prompts`` (reused when the stage resumes) and the counts in
``output_dir/filter.json`` and on stdout.

GRPO then samples ``num_generations`` completions per prompt, scores them with the weighted
rewards of :mod:`training.rewards` (format, action accuracy, thought-action consistency,
optional model judge) and updates the policy. Every reward's mean is in ``loss.jsonl``
(``rewards/<name>/mean``), with the total ``reward``.

Completions are decoded keeping the format's tags even when a tokenizer marks them as
special tokens (trl decodes with ``skip_special_tokens=True``, which would strip them and
fail every format check).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from robix_planner import format as fmt
from robix_planner.config import ConfigError
from training.rewards import RewardSet
from training.train import (
    LOSS_LOG,
    RLStageConfig,
    Stage,
    _check_adapter_input,
    _require,
    apply_freeze,
    dist,
    fix_resume,
    load_model,
    load_processor,
    load_rows,
    loss_logger,
    peft_config,
    save_result,
    set_threads,
    tokenizer_of,
    trainer_args,
    wait_for_everyone,
)

log = logging.getLogger(__name__)

PROMPTS_DIR = "prompts"
FILTER_REPORT = "filter.json"
#: Columns of an RL row that are not passed to the reward functions as columns.
_NOT_COLUMNS = ("prompt", "completion", "_index")

Sampler = Callable[[dict, int], list]
Scorer = Callable[..., list]


# --------------------------------------------------------------------------- decoding


def _tag_ids(tokenizer) -> set[int]:
    return {tokenizer.convert_tokens_to_ids(t) for t in fmt.TAGS}


def _special_ids(tokenizer) -> set[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops: the named special tokens and added special ones."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids


def _special_ids_to_drop(tokenizer) -> set[int]:
    """Special token ids other than the format's tags (which are text of the answer)."""
    return _special_ids(tokenizer) - _tag_ids(tokenizer)


def stop_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return ids


def completion_texts(ids_rows: Sequence[Sequence[int]], tokenizer, stop: set[int] = frozenset()) -> list[str]:
    """Decode generated ids: cut at the first stop id, drop special tokens but keep the format's tags."""
    drop = _special_ids_to_drop(tokenizer)
    texts = []
    for ids in ids_rows:
        ids = [int(i) for i in ids]
        for n, i in enumerate(ids):
            if i in stop:
                ids = ids[:n]
                break
        texts.append(tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False))
    return texts


def tags_are_special(tokenizer) -> bool:
    """Whether the tokenizer would drop a format tag when decoding with skip_special_tokens=True."""
    return bool(_tag_ids(tokenizer) & _special_ids(tokenizer))


def keep_tags(func: Callable, tokenizer) -> Callable:
    """``func`` fed completions re-decoded from trl's ``completion_ids`` with the format tags kept."""

    def wrapped(prompts, completions, completion_ids=None, **columns):
        if completion_ids is not None:
            texts = completion_texts(completion_ids, tokenizer)
            completions = [[{"role": "assistant", "content": t}] if not isinstance(c, str) else t
                           for c, t in zip(completions, texts)]
        return func(prompts, completions, **columns)

    wrapped.__name__ = getattr(func, "__name__", type(func).__name__)
    return wrapped


# --------------------------------------------------------------------------- the variance filter


@dataclass
class FilterReport:
    """What the variance filter saw: candidates, kept (rewards differ), and the groups of equal rewards."""

    candidates: int
    kept: int
    all_equal: int
    #: Groups of equal rewards by their reward ("%g" of the value, rounded to 3 decimals): e.g. {"3": 10, "0": 4}.
    equal_levels: dict
    k: int
    mean_reward: float

    def line(self) -> str:
        pct = 100.0 * self.kept / self.candidates if self.candidates else 0.0
        levels = ", ".join(f"{n} at {level}" for level, n in sorted(self.equal_levels.items(),
                                                                     key=lambda kv: -float(kv[0])))
        return (f"variance filter: kept {self.kept} of {self.candidates} prompts ({pct:.1f}%); "
                f"{self.all_equal} had {self.k} equal rewards ({levels or 'none'}); "
                f"mean reward {self.mean_reward:.3f}")


def score_candidates(rows: Iterable[dict], sample: Sampler, score: Scorer, k: int, *, progress: bool = True,
                     total: Optional[int] = None, desc: str = "variance filter") -> list[list[float]]:
    """For each row: ``k`` completions from ``sample(row, k)``, scored by ``score(prompts, completions, **columns)``."""
    from tqdm import tqdm

    out = []
    for row in tqdm(rows, desc=desc, unit=" prompts", total=total, disable=not progress):
        completions = sample(row, k)
        if len(completions) != k:
            raise ValueError(f"the sampler returned {len(completions)} completions, expected {k}")
        columns = {c: [v] * k for c, v in row.items() if c not in _NOT_COLUMNS}
        out.append([float(r) for r in score([row.get("prompt")] * k, completions, **columns)])
    return out


def select_varied(rewards: Sequence[Sequence[float]], k: int, min_std: float = 1e-6) -> tuple[list[int], FilterReport]:
    """Indices of the groups whose rewards are not all equal (population std > ``min_std``), and a report."""
    keep: list[int] = []
    levels: dict[str, int] = {}
    flat = [r for group in rewards for r in group]
    for i, group in enumerate(rewards):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        if std > min_std:
            keep.append(i)
        else:
            level = f"{round(mean, 3):g}"
            levels[level] = levels.get(level, 0) + 1
    report = FilterReport(candidates=len(rewards), kept=len(keep), all_equal=len(rewards) - len(keep),
                          equal_levels=levels, k=k, mean_reward=(sum(flat) / len(flat)) if flat else 0.0)
    return keep, report


def variance_filter(rows: Sequence[dict], sample: Sampler, score: Scorer, k: int = 8, min_std: float = 1e-6,
                    *, progress: bool = True) -> tuple[list[int], FilterReport]:
    """Robix's filter: sample ``k`` completions per row, keep the rows whose rewards are not all equal."""
    return select_varied(score_candidates(rows, sample, score, k, progress=progress), k, min_std)


class ModelSampler:
    """``sample(row, k)``: ``k`` completions of the row's prompt (and images) from a transformers model."""

    def __init__(self, model, processor, *, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 seed: int = 0):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.stop = stop_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.stop), 0)

    def encode(self, row: dict, k: int):
        from transformers import ProcessorMixin
        from trl.data_utils import prepare_multimodal_messages

        messages = row["prompt"]
        if isinstance(self.processor, ProcessorMixin):
            messages = prepare_multimodal_messages(messages, images=list(row.get("images") or []))
        return self.processor.apply_chat_template([messages] * k, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")

    def __call__(self, row: dict, k: int) -> list[str]:
        import torch

        inputs = self.encode(row, k).to(self.model.device)
        torch.manual_seed(self.seed + int(row.get("_index", 0)))
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id)
        return completion_texts(out[:, inputs["input_ids"].shape[1]:].tolist(), self.tokenizer, self.stop)


def filter_prompts(rows, sampler: Sampler, rewards: RewardSet, cfg, out_dir: Path, *, reuse: bool):
    """Run the variance filter over ``rows`` (sharded over the processes) and save the kept rows.

    Returns ``(kept dataset, report dict)``. With ``reuse``, earlier results in ``out_dir`` are loaded.
    """
    import datasets
    from accelerate.utils import gather_object

    prompts_dir, report_file = out_dir / PROMPTS_DIR, out_dir / FILTER_REPORT
    if reuse and prompts_dir.is_dir() and report_file.is_file():
        log.info("variance filter: reusing %s", prompts_dir)
        return datasets.load_from_disk(str(prompts_dir)), json.loads(report_file.read_text())
    n = len(rows) if cfg.limit is None else min(cfg.limit, len(rows))
    state = dist()
    with state.split_between_processes(list(range(n))) as mine:
        mine_rows = ({**rows[i], "_index": i} for i in mine)  # one row (and its images) in memory at a time
        scores = score_candidates(mine_rows, sampler, rewards.score, cfg.k, total=len(mine),
                                  progress=state.is_local_main_process)
        pairs = list(zip(mine, scores))
    pairs = sorted(gather_object(pairs) if state.num_processes > 1 else pairs)
    keep, report = select_varied([s for _, s in pairs], cfg.k, cfg.min_std)
    kept_ids = [pairs[i][0] for i in keep]
    result = {**asdict(report), "rewards": list(rewards.names), "weights": list(rewards.weights)}
    if state.is_main_process:
        print(report.line(), flush=True)
    if not kept_ids:
        raise ConfigError("the variance filter kept no prompt: every prompt's samples got equal rewards. "
                          "Raise filter.temperature or filter.k, or set filter.enabled=false")
    if state.is_main_process:
        kept = rows.select(kept_ids)
        tmp = out_dir / (PROMPTS_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        kept.save_to_disk(str(tmp))
        shutil.rmtree(prompts_dir, ignore_errors=True)
        tmp.rename(prompts_dir)
        report_file.write_text(json.dumps(result, indent=2))
    wait_for_everyone()
    return datasets.load_from_disk(str(prompts_dir)), result


# --------------------------------------------------------------------------- the stage


def run_rl(cfg: RLStageConfig) -> dict:
    """Run the RL stage: variance filter, then GRPO; returns the done.json summary."""
    model_path = _require(cfg.model, "model")
    output_dir = _require(cfg.output_dir, "output_dir")
    _check_adapter_input(cfg)
    set_threads(cfg.train.threads)
    stage = Stage("rl", cfg, output_dir, cfg.resume)
    try:
        from trl import GRPOConfig, GRPOTrainer

        procs = dist().num_processes
        group = cfg.train.batch_size * procs * cfg.train.grad_accum
        if group % cfg.num_generations:
            raise ConfigError(f"train.batch_size * processes * train.grad_accum = {cfg.train.batch_size} * {procs} * "
                              f"{cfg.train.grad_accum} = {group} must be a multiple of num_generations="
                              f"{cfg.num_generations}")
        rows = load_rows(cfg.data, need=("prompt", "acceptable"))
        processor = load_processor(model_path, cfg.chat_template)
        tokenizer = tokenizer_of(processor)
        rewards = RewardSet.build(cfg.rewards.weights(), cfg.rewards.judge_model)
        # The trainer config comes first: under DeepSpeed ZeRO-3 it makes from_pretrained load the weights sharded.
        args = trainer_args(
            GRPOConfig, cfg, stage.out,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            beta=cfg.beta,
            reward_weights=list(rewards.weights),
        )
        zero3 = getattr(args, "deepspeed_plugin", None) is not None and args.deepspeed_plugin.zero_stage == 3
        reuse = cfg.resume and (stage.out / PROMPTS_DIR).is_dir() and (stage.out / FILTER_REPORT).is_file()
        if cfg.filter.enabled and zero3 and not reuse:
            raise ConfigError("the variance filter samples with the whole model, which DeepSpeed ZeRO-3 shards: run "
                              "the filter without ZeRO-3 (one GPU or ZeRO-2) and train on its output_dir/prompts "
                              "with filter.enabled=false")
        model = load_model(model_path)
        report = None
        if cfg.filter.enabled:
            f = cfg.filter
            model.to(dist().device)
            sampler = ModelSampler(model, processor, temperature=f.temperature, top_p=f.top_p,
                                   max_new_tokens=f.max_new_tokens, seed=cfg.train.seed)
            rows, report = filter_prompts(rows, sampler, rewards, f, stage.out, reuse=cfg.resume)
            model.train()
        per_step = group // cfg.num_generations  # distinct prompts in one step's batch
        if len(rows) < per_step:
            raise ConfigError(f"the RL stage has {len(rows)} prompts but each step samples {per_step} distinct ones "
                              f"(train.batch_size * processes * train.grad_accum / num_generations); lower "
                              "train.batch_size, raise num_generations or give more prompts")
        frozen = apply_freeze(model, cfg.freeze)
        funcs = list(rewards.funcs)
        if tags_are_special(tokenizer):
            funcs = [keep_tags(fn, tokenizer) for fn in funcs]
        trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=rows,
                              processing_class=processor, peft_config=peft_config(cfg.lora),
                              callbacks=[loss_logger(stage.out / LOSS_LOG)])
        fix_resume(trainer)
        result = trainer.train(resume_from_checkpoint=str(stage.checkpoint) if stage.checkpoint else None)
        if result.global_step == 0:
            raise ConfigError(f"GRPO made no step over {len(rows)} prompts; set train.max_steps or more prompts")
        save_result(trainer, stage, model_path, cfg.lora, processor)
        for fn in rewards.funcs:
            if hasattr(fn, "close"):
                fn.close()
        return stage.finish({"input": model_path, "steps": result.global_step, "prompts": len(rows),
                             "filter": report, "rewards": dict(zip(rewards.names, rewards.weights)),
                             "frozen_params": frozen, "lora": cfg.lora is not None})
    finally:
        stage.save_wall()
