"""The training stages: configs, shared machinery, ``init``, ``cpt`` / ``sft`` (trl SFTTrainer) and ``all``.

Each stage reads a model directory (transformers layout, loaded with the Auto classes, so a
local Qwen2.5-VL checkpoint trains exactly like robix-tiny), a dataset directory
(``datasets.load_from_disk``), and writes into its ``output_dir``::

    output_dir/
      checkpoint-N/     trainer checkpoints every train.save_steps (``resume`` continues from the last)
      model/            the result: full weights + processor, or a LoRA adapter + processor (lora.save)
      loss.jsonl        one JSON record per logging step (step, loss, learning_rate, grad_norm, rewards, ...)
      config.yaml       the resolved config of the run
      done.json         written last: steps, wall time, first/last loss; ``robix train all`` skips a stage that has it
      wall.json         wall seconds spent so far, summed over resumed runs

The RL stage (GRPO) lives in :mod:`training.rl`; its config is here with the others so that
``robix train all`` holds one typed tree. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import msgspec

from robix_planner.backends.base import ModelConfig
from robix_planner.config import Config, ConfigError, apply_overrides, convert, read_yaml, to_dict

log = logging.getLogger(__name__)

STAGES = ("init", "cpt", "sft", "rl")
MODEL_DIR = "model"
LOSS_LOG = "loss.jsonl"
DONE = "done.json"
WALL = "wall.json"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSSES = ("assistant", "all")


# =========================================================================== configs


class LoraConfig(Config):
    """``lora:`` train a peft LoRA adapter instead of every weight."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    #: Module names (or name suffixes) to adapt, or "all-linear" (every linear layer but the output head).
    target_modules: Union[str, list[str]] = "all-linear"
    #: "merged": fold the adapter into the weights and save a full model; "adapter": save the adapter only
    #: (loads on top of the stage's input model: ``model.adapter`` of the hf backend, or the Auto classes).
    save: str = "merged"


class DataConfig(Config):
    """``data:`` where the stage's rows come from."""

    #: A dataset saved with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``).
    path: Optional[str] = None
    #: Build the rows on the fly through :mod:`training.data` instead: ``{builder: cpt|sft|rl, ...}``, the
    #: other keys being the builder's keyword arguments (e.g. ``{builder: sft, split: train, seed: 0}``).
    build: Optional[dict[str, Any]] = None
    #: The split to train on: the ``DatasetDict`` key, or the value of a ``split`` column (None: every row).
    split: Optional[str] = "train"
    #: Use at most this many rows (the first ones).
    limit: Optional[int] = None
    #: More sources mixed in (each a mapping of these keys but ``mix``; ``split`` defaults to None): their
    #: rows join the stage's, shuffled in by the trainer. Only the columns every source has are kept
    #: (``messages``, ``images``, ...), e.g. ``mix: [{path: data/copy, limit: 8000}]``.
    mix: list[dict[str, Any]] = []


class TrainConfig(Config):
    """``train:`` optimisation, schedule, checkpoints, logging."""

    #: Optimizer steps; -1: run ``epochs`` epochs.
    max_steps: int = -1
    epochs: float = 1.0
    #: Rows per device per micro-batch; the effective batch is batch_size * grad_accum * processes.
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    #: A transformers scheduler name: cosine_with_min_lr (decays to lr * min_lr_ratio), cosine, linear, constant, ...
    schedule: str = "cosine_with_min_lr"
    min_lr_ratio: float = 0.1
    #: Linear warm-up: a fraction of the steps (< 1) or a number of steps (>= 1).
    warmup: float = 0.1
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    #: Gradient clipping (global norm); 0 disables it.
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 200
    #: Checkpoints kept (the oldest are deleted); None keeps all.
    save_total_limit: Optional[int] = 2
    logging_steps: int = 10
    #: auto: bf16 on a GPU that supports it, else fp32.
    precision: str = "auto"
    gradient_checkpointing: bool = False
    #: Truncate longer rows to this many tokens (None: no truncation; a cut through an image fails).
    max_length: Optional[int] = None
    #: torch threads per process (0: torch's default).
    threads: int = 0
    #: Data-loader worker processes.
    workers: int = 0


class InitConfig(Config):
    """``robix train init``: a tokenizer trained on the corpus and a fresh random robix-tiny."""

    output_dir: Optional[str] = None
    #: Datasets whose texts (every text part of messages / prompt / completion / text) train the tokenizer:
    #: directories, or data.build mappings ({builder: cpt|sft|rl, ...}) made on the fly.
    corpus: list[Union[str, dict[str, Any]]] = []
    #: Read at most this many rows per corpus dataset.
    max_texts: int = 200_000
    vocab_size: int = 4096
    #: robix-tiny's architecture, passed to ``robix_planner.models.build_model``.
    architecture: dict[str, Any] = {}
    seed: int = 0


class _StageBase(Config):
    #: The input model directory (transformers layout, or a LoRA adapter directory saved by a stage).
    model: Optional[str] = None
    output_dir: Optional[str] = None
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: Optional[LoraConfig] = None
    #: A Jinja chat template file that replaces the processor's (e.g. one with {% generation %} markers).
    chat_template: Optional[str] = None
    #: Regular expressions of parameter names to freeze (e.g. "^model\\.visual\\." for the vision encoder).
    freeze: list[str] = []
    #: Continue from the last checkpoint in output_dir.
    resume: bool = True
    #: Extra trl config fields (SFTConfig / GRPOConfig), checked against the class.
    trl: dict[str, Any] = {}


class SFTStageConfig(_StageBase, kw_only=True):
    """``robix train cpt`` / ``robix train sft`` (trl SFTTrainer)."""

    #: "assistant": loss on the assistant turns only (the completion of prompt-completion rows); "all": every token.
    loss: str = "assistant"


class RewardsConfig(Config):
    """``rewards:`` weights of the RL rewards (:mod:`training.rewards`); 0 disables one."""

    format: float = 1.0
    action: float = 1.0
    consistency: float = 1.0
    #: The optional model judge (through robix_planner.backends); needs judge_model.
    judge: float = 0.0
    judge_model: Optional[ModelConfig] = None

    def weights(self) -> dict[str, float]:
        return {"format": self.format, "action": self.action, "consistency": self.consistency, "judge": self.judge}


class FilterConfig(Config):
    """``filter:`` Robix's variance filter: keep prompts whose k sampled completions differ in reward."""

    enabled: bool = True
    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    #: Examine at most this many candidate prompts (None: all).
    limit: Optional[int] = None
    #: Rewards closer than this count as equal.
    min_std: float = 1e-6


class RLStageConfig(_StageBase, kw_only=True):
    """``robix train rl`` (trl GRPOTrainer)."""

    rewards: RewardsConfig = RewardsConfig()
    filter: FilterConfig = FilterConfig()
    #: Completions sampled per prompt (GRPO group size); must divide batch_size * processes * grad_accum.
    num_generations: int = 8
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    #: KL coefficient against the input model (0: no reference model).
    beta: float = 0.0


class AllConfig(Config):
    """``robix train all``: init -> cpt -> sft -> rl, each stage's model the next one's input.

    A stage section may be a mapping or the path of a stage config file (relative to this
    file); a missing or null section skips the stage. Stage outputs go to
    ``output_dir/<stage>``; ``model`` and ``output_dir`` inside the sections are set by the chain.
    """

    output_dir: str = "runs/robix-tiny"
    #: The first stage's input when there is no init section.
    model: Optional[str] = None
    init: Optional[InitConfig] = None
    cpt: Optional[SFTStageConfig] = None
    sft: Optional[SFTStageConfig] = None
    rl: Optional[RLStageConfig] = None


STAGE_CONFIGS: dict[str, type] = {"init": InitConfig, "cpt": SFTStageConfig, "sft": SFTStageConfig,
                                  "rl": RLStageConfig, "all": AllConfig}


def load_config(stage: str, path: Optional[str], overrides: list[str] = ()) -> Config:
    """The typed config of ``stage`` from a YAML file and dotted overrides (unknown keys are errors)."""
    cls = STAGE_CONFIGS[stage]
    tree = read_yaml(path) if path else {}
    if stage == "all":
        base = Path(path).parent if path else Path(".")
        for name in STAGES:
            if isinstance(tree.get(name), str):
                include = Path(tree[name])
                tree[name] = read_yaml(include if include.is_absolute() else base / include)
    apply_overrides(tree, overrides)
    cfg = convert(cls, tree, source=str(path) if path else "config")
    _check(stage, cfg)
    return cfg


def _check(stage: str, cfg: Config) -> None:
    if stage == "all":
        for name in STAGES[1:]:
            section = getattr(cfg, name)
            if section is not None:
                _check(name, section)
        return
    if isinstance(cfg, _StageBase):
        t = cfg.train
        if t.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={t.precision!r}; use one of {PRECISIONS}")
        if t.batch_size < 1 or t.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
            raise ConfigError("set train.max_steps > 0, or train.max_steps=-1 with train.epochs > 0")
        if t.save_steps < 1 or t.logging_steps < 1:
            raise ConfigError("train.save_steps and train.logging_steps must be >= 1")
        if cfg.lora is not None and cfg.lora.save not in ("merged", "adapter"):
            raise ConfigError(f"lora.save={cfg.lora.save!r}; use 'merged' or 'adapter'")
        if cfg.data.path is None and cfg.data.build is None:
            raise ConfigError("data.path (a dataset directory) or data.build is required")
    if isinstance(cfg, SFTStageConfig) and cfg.loss not in LOSSES:
        raise ConfigError(f"loss={cfg.loss!r}; use one of {LOSSES}")
    if isinstance(cfg, RLStageConfig):
        if cfg.num_generations < 2:
            raise ConfigError("num_generations must be >= 2: GRPO compares completions of the same prompt")
        if cfg.filter.enabled and cfg.filter.k < 2:
            raise ConfigError("filter.k must be >= 2 to see a difference in reward")
        try:
            from training.rewards import RewardSet

            RewardSet.build(cfg.rewards.weights(), cfg.rewards.judge_model)
        except ValueError as exc:
            raise ConfigError(f"rewards: {exc}") from None


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# =========================================================================== shared machinery


def _require(value: Optional[str], key: str) -> str:
    if not value:
        raise ConfigError(f"{key} is required (set it in the config file or as {key}=...)")
    return value


def set_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def register_models() -> None:
    """Make robix-tiny loadable through the Auto classes (``robix_planner.models.register``), when it exists."""
    try:
        import robix_planner.models as models
    except ModuleNotFoundError:
        return
    register = getattr(models, "register", None)
    if register is not None:
        register()


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_model(path: str | os.PathLike, *, dtype: str = "float32"):
    """A model directory loaded with the Auto classes; a LoRA adapter directory is merged into its base.

    A vision-language checkpoint loads with ``AutoModelForImageTextToText``, a text-only one
    with ``AutoModelForCausalLM``. Nothing is downloaded.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    register_models()
    path = Path(path).resolve()  # absolute: a LoRA adapter trained on it records this path as its base
    if not path.is_dir():
        raise ConfigError(f"model directory {str(path)!r} does not exist")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if is_adapter(path):
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ConfigError(f"{path}: the adapter's base model {base!r} is not a local directory")
        model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(path))
        return model.merge_and_unload()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model directory {str(path)!r}: cannot read its config ({exc})") from exc
    errors = []
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) not in auto._model_mapping:
            errors.append(f"{auto.__name__} does not know {type(config).__name__}")
            continue
        return auto.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    raise ConfigError(f"model directory {str(path)!r}: {'; '.join(errors)}. Is it a transformers checkpoint "
                      "(for robix-tiny: is robix_planner.models importable)?")


def load_processor(path: str | os.PathLike, chat_template: Optional[str] = None):
    """The processor (a tokenizer for a text-only model); an adapter's own, else its base model's."""
    from robix_planner.backends import hf  # the hf backend's loader: Qwen-VL without torchvision

    register_models()
    path = Path(path)
    if is_adapter(path) and not any((path / f).is_file() for f in ("tokenizer_config.json", "processor_config.json")):
        path = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    processor = hf.load_processor(path)
    if chat_template is not None:
        f = Path(chat_template)
        if not f.is_file():
            raise ConfigError(f"chat_template={chat_template!r} is not a file")
        processor.chat_template = f.read_text()
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.chat_template = processor.chat_template
    return processor


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def apply_freeze(model, patterns: list[str]) -> int:
    """Freeze parameters whose names match any of ``patterns``; returns how many were frozen."""
    frozen = 0
    for pat in patterns:
        rx = re.compile(pat)
        hits = [(n, p) for n, p in model.named_parameters() if rx.search(n)]
        if not hits:
            names = ", ".join(n for n, _ in list(model.named_parameters())[:8])
            raise ConfigError(f"freeze pattern {pat!r} matches no parameter (names look like: {names}, ...)")
        for _, p in hits:
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += 1
    return frozen


def peft_config(lora: Optional[LoraConfig]):
    if lora is None:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules)


def load_rows(data: DataConfig, *, need: tuple[str, ...] = ()):
    """The stage's dataset: load_from_disk (or built by training.data), split and limit applied."""
    import datasets

    if data.path is not None:
        p = Path(data.path)
        if not p.is_dir():
            raise ConfigError(f"data.path={data.path!r} is not a directory (a dataset saved with save_to_disk)")
        ds = datasets.load_from_disk(str(p))
    else:
        ds = _build_rows(data.build or {})
    if isinstance(ds, datasets.DatasetDict):
        if data.split is None or data.split not in ds:
            raise ConfigError(f"data.split={data.split!r}: the dataset has splits {sorted(ds)}")
        ds = ds[data.split]
    elif data.split is not None and "split" in ds.column_names:
        ds = ds.filter(lambda s: s == data.split, input_columns="split")
    if data.limit is not None:
        ds = ds.select(range(min(data.limit, len(ds))))
    if len(ds) == 0:
        raise ConfigError(f"the dataset ({data.path or 'data.build'}, split {data.split!r}) has no rows")
    if data.mix:
        ds = _mix(ds, data.mix)
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise ConfigError(f"the dataset lacks the column(s) {missing}; it has {ds.column_names}")
    return ds


def _mix(ds, sources: list[dict[str, Any]]):
    """``ds`` with the rows of the ``data.mix`` sources appended (the columns all of them share)."""
    import datasets

    parts = [ds]
    for i, source in enumerate(sources):
        if "mix" in source:
            raise ConfigError(f"data.mix[{i}]: a mixed-in source cannot mix in more")
        parts.append(load_rows(convert(DataConfig, {"split": None, **source}, source=f"data.mix[{i}]")))
    common = [c for c in ds.column_names if all(c in p.column_names for p in parts)]
    if "messages" not in common and not {"prompt", "completion"} <= set(common):
        raise ConfigError(f"data.mix: the sources share only the columns {common}; they need messages "
                          "(or prompt and completion) in common")
    try:
        return datasets.concatenate_datasets([p.select_columns(common) for p in parts])
    except ValueError as exc:
        raise ConfigError(f"data.mix: the sources' columns {common} differ in type ({exc})") from None


#: data.build's ``builder`` -> the training.data function that makes the rows.
BUILDERS = {"cpt": "training.data.cpt:build_cpt", "sft": "training.data.episodes:build_sft",
            "rl": "training.data.episodes:build_rl"}


def _build_rows(build: dict):
    """data.build: rows made on the fly by training.data: ``{builder: cpt|sft|rl, **its keyword arguments}``."""
    import importlib

    kwargs = dict(build)
    name = kwargs.pop("builder", None)
    if name not in BUILDERS:
        raise ConfigError(f"data.build.builder={name!r}; use one of {sorted(BUILDERS)} (or give data.path)")
    module, _, fn = BUILDERS[name].partition(":")
    try:
        builder = getattr(importlib.import_module(module), fn)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ConfigError(f"data.build: cannot load {BUILDERS[name]} ({exc}); give data.path instead") from None
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"data.build: {BUILDERS[name]}: {exc}") from None


def precision_flags(precision: str) -> dict:
    import torch

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def trainer_args(cls, cfg: _StageBase, output_dir: Path, **extra):
    """A trl config (SFTConfig / GRPOConfig) from the stage config; ``cfg.trl`` adds any other field."""
    import dataclasses

    import torch

    t = cfg.train
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.trl) - fields)
    if unknown:
        raise ConfigError(f"trl: {unknown} are not {cls.__name__} fields")
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.schedule == "cosine_with_min_lr" else {},
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=t.workers,
        report_to="none",
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(t.precision),
    )
    kwargs.update(extra)
    kwargs.update(cfg.trl)
    return cls(**kwargs)


def loss_logger(path: Path):
    """A TrainerCallback appending every log record to ``path`` as one JSON line (main process only)."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with Path(path).open("a") as f:
                f.write(json.dumps(record) + "\n")

    return JsonlLog()


def read_log(path: Path) -> list[dict]:
    """The records of a loss.jsonl."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run logs those steps again)."""
    if path.is_file():
        keep = [r for r in read_log(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def last_checkpoint(output_dir: Path) -> Optional[Path]:
    from transformers.trainer_utils import get_last_checkpoint

    if not output_dir.is_dir():
        return None
    found = get_last_checkpoint(str(output_dir))
    return Path(found) if found else None


def dist():
    """The process group state (accelerate's ``PartialState``), on CPU when there is no GPU.

    Without a GPU it is created with ``cpu=True``, so processes started by ``torchrun`` /
    ``accelerate launch`` (which sets ``WORLD_SIZE``) join one gloo group; the trainer's own
    state (``use_cpu``) is then the same. It must be the first ``PartialState`` of the process.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return dist().is_main_process


def wait_for_everyone() -> None:
    dist().wait_for_everyone()


def read_done(output_dir: str | os.PathLike) -> Optional[dict]:
    f = Path(output_dir) / DONE
    return json.loads(f.read_text()) if f.is_file() else None


class Stage:
    """Bookkeeping shared by every stage: output directory, resume point, wall time, done marker."""

    def __init__(self, name: str, cfg: Config, output_dir: str, resume: bool):
        self.name = name
        self.cfg = cfg
        self.out = Path(output_dir)
        self.t0 = time.monotonic()
        self.checkpoint = last_checkpoint(self.out)
        if self.checkpoint is not None and not resume:
            raise ConfigError(f"{self.out} holds {self.checkpoint.name} from an earlier run; set resume=true to "
                              "continue it, or choose another output_dir")
        prior = self.out / WALL
        self.wall_before = json.loads(prior.read_text())["wall_s"] if (prior.is_file() and resume) else 0.0
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
            log_path = self.out / LOSS_LOG
            if self.checkpoint is not None:
                _truncate_log(log_path, int(self.checkpoint.name.rsplit("-", 1)[1]))
            elif log_path.exists():
                log_path.unlink()
            (self.out / DONE).unlink(missing_ok=True)
        wait_for_everyone()
        if self.checkpoint is not None:
            log.info("%s: resuming from %s", name, self.checkpoint)

    @property
    def model_dir(self) -> Path:
        return self.out / MODEL_DIR

    def wall_s(self) -> float:
        return self.wall_before + time.monotonic() - self.t0

    def save_wall(self) -> None:
        if is_main_process() and self.out.is_dir():
            (self.out / WALL).write_text(json.dumps({"wall_s": round(self.wall_s(), 3)}))

    def finish(self, summary: dict) -> dict:
        """Write done.json (main process) and print the stage's line; returns the summary."""
        records = read_log(self.out / LOSS_LOG)
        losses = [r["loss"] for r in records if "loss" in r]
        rewards = [r["reward"] for r in records if "reward" in r]
        done = {"stage": self.name, "model": str(self.model_dir), "wall_s": round(self.wall_s(), 3),
                "processes": dist().num_processes,
                "resumed_from": self.checkpoint.name if self.checkpoint else None,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                **({"first_reward": rewards[0], "last_reward": rewards[-1]} if rewards else {}),
                **summary}
        self.save_wall()
        if is_main_process():
            (self.out / DONE).write_text(json.dumps(done, indent=2))
            if rewards:
                what = f", reward {rewards[0]:.4g} -> {rewards[-1]:.4g}"
            elif losses:
                what = f", loss {losses[0]:.4g} -> {losses[-1]:.4g}"
            else:
                what = ""
            print(f"[{self.name}] done in {done['wall_s']:.1f} s{what}; model in {self.model_dir}", flush=True)
        wait_for_everyone()
        return done


def save_result(trainer, stage: Stage, input_model: str, lora: Optional[LoraConfig], processor) -> None:
    """Save the trained model into ``stage.model_dir``: full weights, merged LoRA, or the adapter alone."""
    out = stage.model_dir
    if lora is not None and lora.save == "merged":
        adapter_dir = stage.out / "adapter"
        trainer.save_model(str(adapter_dir))
        wait_for_everyone()
        if is_main_process():
            merged = load_model(input_model)
            from peft import PeftModel

            merged = PeftModel.from_pretrained(merged, str(adapter_dir)).merge_and_unload()
            tmp = stage.out / (MODEL_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            shutil.rmtree(adapter_dir, ignore_errors=True)
    else:
        trainer.save_model(str(out))
        if is_main_process():
            processor.save_pretrained(out)
    wait_for_everyone()


def fix_resume(trainer) -> None:
    """Make ``trainer`` restore full weights from a checkpoint through ``from_pretrained``.

    transformers' Trainer (5.x) restores a checkpoint's weights with a non-strict
    ``load_state_dict`` of the saved file; for models whose ``save_pretrained`` renames keys
    (Qwen2.5-VL saves ``visual.*`` / ``model.layers.*``, its modules are ``model.visual.*`` /
    ``model.language_model.*``) no key matches and the resumed run silently restarts from the
    input weights. Here the checkpoint is loaded with the Auto classes (which map the keys
    back) and copied in strictly. LoRA checkpoints (peft's own loading), DeepSpeed and FSDP
    (their own checkpoint formats) keep the trainer's path.
    """
    from accelerate.utils import is_peft_model

    original = trainer._load_from_checkpoint

    def load(resume_from_checkpoint, model=None):
        model = trainer.model if model is None else model
        if is_peft_model(model) or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            return original(resume_from_checkpoint, model)
        saved = load_model(resume_from_checkpoint)
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved

    trainer._load_from_checkpoint = load


def _check_adapter_input(cfg: _StageBase) -> None:
    if cfg.lora is not None and cfg.lora.save == "adapter" and is_adapter(cfg.model):
        raise ConfigError(f"model={cfg.model!r} is itself a LoRA adapter; an adapter trained on it would not load on "
                          "its base. Use lora.save=merged for the earlier stage or for this one")


# =========================================================================== cpt / sft


def _check_chat_template(processor, needs_markers: bool) -> None:
    if not needs_markers:
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(processor, "chat_template", None)
    if template and has_generation_markers(template):
        return
    try:
        get_training_chat_template(processor)  # trl patches the templates of known models (Qwen2.5-VL, ...)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "loss=assistant needs a chat template with {% generation %} ... {% endgeneration %} around the "
            f"assistant turns, and trl cannot patch this model's ({exc}). Give one with chat_template=FILE.jinja, "
            "or set loss=all"
        ) from None


def run_sft(cfg: SFTStageConfig, name: str = "sft") -> dict:
    """Run a cpt or sft stage: trl SFTTrainer over the stage's dataset; returns the done.json summary."""
    model_path = _require(cfg.model, "model")
    output_dir = _require(cfg.output_dir, "output_dir")
    _check_adapter_input(cfg)
    set_threads(cfg.train.threads)
    stage = Stage(name, cfg, output_dir, cfg.resume)
    try:
        from trl import SFTConfig, SFTTrainer

        rows = load_rows(cfg.data)
        conversational = "messages" in rows.column_names
        if not conversational and not {"prompt", "completion"} <= set(rows.column_names):
            raise ConfigError(f"{name}: the dataset needs a 'messages' column or 'prompt' and 'completion' columns; "
                              f"it has {rows.column_names}")
        processor = load_processor(model_path, cfg.chat_template)
        assistant_only = cfg.loss == "assistant" and conversational
        _check_chat_template(processor, assistant_only)
        # The trainer config comes first: under DeepSpeed ZeRO-3 it makes from_pretrained load the weights sharded.
        args = trainer_args(
            SFTConfig, cfg, stage.out,
            max_length=cfg.train.max_length,
            assistant_only_loss=assistant_only,
            completion_only_loss=(cfg.loss == "assistant") if not conversational else None,
        )
        if args.train_sampling_strategy == "group_by_length" and args.length_column_name not in rows.column_names:
            rows = add_length_column(rows, args.length_column_name)
        model = load_model(model_path)
        frozen = apply_freeze(model, cfg.freeze)
        trainer = _sft_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=rows, processing_class=processor,
                             peft_config=peft_config(cfg.lora), callbacks=[loss_logger(stage.out / LOSS_LOG)])
        fix_resume(trainer)
        result = trainer.train(resume_from_checkpoint=str(stage.checkpoint) if stage.checkpoint else None)
        save_result(trainer, stage, model_path, cfg.lora, processor)
        return stage.finish({"input": model_path, "steps": result.global_step, "rows": len(rows),
                             "frozen_params": frozen, "lora": cfg.lora is not None})
    finally:
        stage.save_wall()


def _sft_trainer_class(base):
    """``base`` (trl's SFTTrainer) keeping the length column that the group_by_length sampler reads.

    SFTTrainer drops every column of a vision dataset but messages/prompt/completion/images before the
    sampler is built, and the sampler then fails for want of input_ids.
    """
    class RobixSFTTrainer(base):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
                self._signature_columns = [*self._signature_columns, self.args.length_column_name]

    return RobixSFTTrainer


def add_length_column(rows, column: str = "length"):
    """``rows`` with a ``column`` of approximate lengths (text characters / 4, plus 16 per image).

    transformers' ``group_by_length`` sampler batches rows of similar length together, so that batches of
    whole episodes (500 to 2,600 tokens) are not mostly padding; conversational rows carry no input_ids
    for it to measure, and the order is all it needs.
    """
    def length(messages=None, prompt=None, completion=None, text=None, images=None):
        n = sum(len(t) for t in corpus_texts_of({"messages": messages, "prompt": prompt,
                                                  "completion": completion, "text": text}))
        return {column: n // 4 + 16 * len(images or [])}

    import datasets

    cols = [c for c in ("messages", "prompt", "completion", "text", "images") if c in rows.column_names]
    # Only the lengths of the images lists are needed: decoding them would cost as much as the training.
    plain = rows.cast_column("images", datasets.List(datasets.Image(decode=False))) if "images" in cols else rows
    lengths = plain.map(lambda *a: length(**dict(zip(cols, a))), input_columns=cols,
                        remove_columns=plain.column_names, desc="row lengths")[column]
    return rows.add_column(column, lengths)


# =========================================================================== init


def corpus_texts(sources: list, max_rows: int):
    """Every text part of the rows of the ``sources`` datasets (messages, prompt, completion, text).

    A source is a dataset directory or a data.build mapping.
    """
    import datasets

    for path in sources:
        ds = datasets.load_from_disk(path) if isinstance(path, str) else _build_rows(path)
        parts = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
        for part in parts:
            cols = [c for c in ("messages", "prompt", "completion", "text") if c in part.column_names]
            if not cols:
                raise ConfigError(f"corpus {path!r} has none of the columns messages, prompt, completion, text")
            part = part.select_columns(cols)
            for row in part.select(range(min(max_rows, len(part)))):
                yield from corpus_texts_of(row)


def corpus_texts_of(row: dict):
    """The text parts of one row: its messages' text contents, prompt, completion and text."""
    for c in ("messages", "prompt", "completion", "text"):
        value = row.get(c)
        if isinstance(value, str):
            yield value
            continue
        for message in value or []:
            content = message.get("content")
            if isinstance(content, str):
                yield content
            else:
                for p in content or []:
                    if p.get("type") == "text" and p.get("text"):
                        yield p["text"]


def run_init(cfg: InitConfig) -> dict:
    """Train the tokenizer on the corpus and save a fresh random robix-tiny (``robix_planner.models``)."""
    output_dir = Path(_require(cfg.output_dir, "output_dir"))
    try:
        import robix_planner.models as models
    except ModuleNotFoundError:
        raise ConfigError("robix train init needs robix_planner.models (robix-tiny), which is not installed") from None
    for fn in ("build_tokenizer", "build_model"):
        if not hasattr(models, fn):
            raise ConfigError(f"robix_planner.models has no {fn}()")
    if not cfg.corpus:
        raise ConfigError("corpus: list the dataset directories whose texts train the tokenizer")
    for p in cfg.corpus:
        if isinstance(p, str) and not Path(p).is_dir():
            raise ConfigError(f"corpus entry {p!r} is not a dataset directory")
    stage = Stage("init", cfg, str(output_dir), resume=True)
    try:
        summary = {}
        if is_main_process():
            from tqdm import tqdm

            register_models()
            texts = list(tqdm(corpus_texts(cfg.corpus, cfg.max_texts), desc="init: corpus texts", unit=" texts"))
            tokenizer = models.build_tokenizer(texts, cfg.vocab_size)
            model = models.build_model({"seed": cfg.seed, **cfg.architecture}, tokenizer)
            processor = models.build_processor(tokenizer, model.config) if hasattr(models, "build_processor") else None
            tmp = output_dir / (MODEL_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            (processor or tokenizer).save_pretrained(tmp)
            shutil.rmtree(stage.model_dir, ignore_errors=True)
            tmp.rename(stage.model_dir)
            summary = {"texts": len(texts), "vocab_size": len(tokenizer),
                       "parameters": sum(p.numel() for p in model.parameters())}
        wait_for_everyone()
        return stage.finish(summary)
    finally:
        stage.save_wall()


# =========================================================================== all


def run_stage(name: str, cfg: Config) -> dict:
    if name == "init":
        return run_init(cfg)
    if name == "rl":
        from training.rl import run_rl

        return run_rl(cfg)
    return run_sft(cfg, name)


def chain(cfg: AllConfig) -> AllConfig:
    """``cfg`` with each stage's ``output_dir`` (``<output_dir>/<stage>``) and ``model`` (the previous stage's) set."""
    root = Path(cfg.output_dir)
    current = cfg.model
    changes: dict[str, Any] = {}
    for name in STAGES:
        section = getattr(cfg, name)
        if section is None:
            continue
        fields: dict[str, Any] = {"output_dir": str(root / name)}
        if name != "init":
            if current is None:
                raise ConfigError(f"stage {name} needs an input model: set model=DIR or add an init section")
            fields["model"] = current
        changes[name] = msgspec.structs.replace(section, **fields)
        current = str(root / name / MODEL_DIR)
    return msgspec.structs.replace(cfg, **changes)


def run_all(cfg: AllConfig) -> dict[str, dict]:
    """init -> cpt -> sft -> rl; a stage with a done.json is skipped; prints the wall time per stage."""
    cfg = chain(cfg)
    results: dict[str, dict] = {}
    final = cfg.model
    for name in STAGES:
        section = getattr(cfg, name)
        if section is None:
            continue
        done = read_done(section.output_dir)
        if done is not None:
            if is_main_process():
                print(f"[{name}] already done ({done['wall_s']:.1f} s): skipped", flush=True)
            results[name] = {**done, "skipped": True}
        else:
            if is_main_process():
                print(f"[{name}] starting: {getattr(section, 'model', None) or 'fresh'} -> {section.output_dir}",
                      flush=True)
            results[name] = run_stage(name, section)
        final = str(Path(section.output_dir) / MODEL_DIR)
    if is_main_process():
        print("\nstage   wall s   status", flush=True)
        for name, r in results.items():
            print(f"{name:6} {r['wall_s']:8.1f}   {'skipped (done earlier)' if r.get('skipped') else 'ran'}")
        print(f"total  {sum(r['wall_s'] for r in results.values()):8.1f}   final model: {final}", flush=True)
    return results
