"""The ``hf`` backend: a local transformers VLM, streamed token by token, cancellable, with prefix reuse.

Loading (nothing is downloaded; every ``from_pretrained`` gets ``local_files_only=True``)::

    model:
      backend: hf
      path: /models/Qwen2.5-VL-3B-Instruct     # a directory in the transformers layout
      adapter: /runs/sft/adapter               # optional peft (LoRA) adapter on top
      device: cuda                             # cpu | cuda | cuda:1 | auto
      dtype: bfloat16                          # float32 | bfloat16 | float16 | auto (the checkpoint's)
      prefill_chunk_tokens: 128                # longest piece of prompt fed in one forward call
      kv_cache_dtype: model                    # CPU: bfloat16 | auto caches keys/values in bfloat16 (faster)

``AutoProcessor`` + ``AutoModelForImageTextToText`` load the checkpoint. Qwen-VL processors also
want a video processor, which needs torchvision; when torchvision is missing the processor is
loaded without it (images only, through the Pillow image processor), which is all the planner
needs.

Decoding is a hand-written loop over the model's forward with a ``DynamicCache``: greedy when
``temperature == 0``, else temperature + top-p sampling from a generator seeded with ``seed``.
It stops at an end-of-sequence token (``generation_config.eos_token_id`` and the tokenizer's),
after ``max_new_tokens``, or when ``cancel`` is set. (``model.generate`` with a StoppingCriteria
would also stop after one step, but a streamer thread and a stopping criterion only see whole
steps, and ``generate`` keeps no cache we could crop and reuse for the next prompt; the manual
loop does both.)

**Cancellation inside the forward pass.** ``cancel`` is checked before and after every forward
call and also *inside* it: a forward pre-hook on every repeated block of the model (the decoder
layers and vision blocks that transformers lists in ``_no_split_modules``), on each block's
children (attention, MLP) and grandchildren (their projections) and on the blocks' neighbours (embeddings, rotary tables,
merger) raises a private exception once ``cancel`` is set, or once a newer ``generate``
superseded this one; on CPU the attention of a prefill piece over a cached
prefix is computed in slices of 32 query rows with the same check between slices (see
:func:`_cpu_attention`), and the prompt encoding checks between its processor calls. A cancel
therefore lands within one attention slice or projection of one layer, in a decoding step as in
a prefill. The layers that already ran have appended the interrupted piece's keys and values to
the cache; they are cropped back to the last complete position, so the cache stays consistent
and the next call reuses everything fed before the interrupted piece. A prompt is prefilled in
pieces of at most ``prefill_chunk_tokens`` tokens (an image is never split); smaller pieces
bound a projection (and, on a GPU where kernels run ahead of the hooks, a whole forward call)
at the cost of more forward calls. No token computed after the cancel is yielded.

**The thread that runs the model** is lowered to ``nice`` (Linux, default 10) the first time it
runs a generation, so that the node's own threads (the bus, the halt, the cancel itself) preempt
the model at once when CPU cores are scarce instead of queueing behind it.

**CPU attention.** On CPU, a model that uses transformers' ``sdpa`` attention is switched to
:func:`_cpu_attention` (registered with transformers' ``AttentionInterface``): the same
arithmetic, but a decoding step reads each cached key and value once instead of once per query
head that shares it (grouped-query attention), which is what a decoding step over a long
context spends its time on.

**Prefix reuse** (``prefix_cache: true``): the backend keeps the tokens whose keys and values are
in the cache, each tagged with its image (a content hash) when it is an image placeholder. For
the next prompt it takes the longest common prefix of the two tag sequences (an image whose
pixels changed breaks the prefix at its first token, even though its placeholder tokens are
identical), crops the cache to it, and prefills only the suffix, with the pixel inputs of only
the images in the suffix. Positions of the suffix continue the prefix's, including Qwen-VL's 3-D
multimodal RoPE (see :mod:`robix_planner.backends.qwen_vl`). The per-step cost is then that of
the suffix (the new observation and utterance) plus the decoding, not of the whole history, as
long as the prompt only grows at the end. Changing an early token (dropping an old image from
the middle of the history) recomputes everything after it.

**Incremental encoding.** The chat template renders the whole conversation (cheap), and the
text is cut into *pieces* just before every added token of the tokenizer (``<|im_start|>``,
``<|image_pad|>``, the Robix tags, ...). Tokenizers split added tokens out before anything else,
so a piece tokenises the same on its own as inside the whole text; each piece is run through the
processor once (with its image, if it holds one) and kept, keyed by its text and its images'
hashes, for as long as it stays in the prompt. A step therefore tokenises and image-processes
only its new pieces, and the pixel inputs of every image come from that cache. Before relying on
it, the backend checks on real prompts (until one with an image has passed) that the pieces
joined give exactly the processor's full encoding, token for token and pixel for pixel; a
processor for which they differ (a tokenizer that adds a prefix space only at the very start,
processors that pad images batch-wise) is logged and encoded whole every step.

An :class:`~robix_planner.backends.base.ImagePart` is treated as immutable: its content hash is
computed once per object (its pixels must not change after it has been sent).

``last_stats`` reports prompt_tokens, cached_tokens, new_tokens, prefill_ms, decode_ms, cancelled,
and in ``extra``: ``process_ms`` (chat template + processor), ``encoding`` ("incremental" |
"full" | "check"), ``stop`` ("eos" | "length" | "cancel" | "superseded" | "error"), ``images``.

One backend serves one planner: a new :meth:`HFBackend.generate` supersedes a generation that is
still running (the old one stops within one attention slice or projection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from robix_planner import format as fmt
from robix_planner.backends.base import (
    Backend,
    BackendError,
    GenerationStats,
    ModelConfig,
    Prompt,
)
from robix_planner.backends.qwen_vl import positions_for
from robix_planner.config import ConfigError

try:  # fail at the boundary with an instruction, not a bare ImportError
    import numpy as np
    import torch
    import transformers
    from torch.nn import functional as _F
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa_attention
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(
        f"model.backend='hf' needs torch and transformers ({exc}); install them with "
        "pip install 'robix-planner[model]' or use model.backend=openai|scripted"
    ) from None

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class _Cancelled(Exception):
    """Raised by the cancel hooks inside the model's forward (never leaves the backend)."""


class HFBackend(Backend):
    """A local transformers VLM behind the :class:`Backend` interface."""

    accepts_plan_choices = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._lock = threading.Lock()  # held for one forward call at a time, never across a yield
        self._epoch = 0  # bumped by each generate(); an older generation stops when it sees it
        self._device = _resolve_device(config.device)
        self._dtype = _DTYPES.get(config.dtype)
        if self._dtype is None:
            raise ConfigError(f"model.dtype={config.dtype!r} is unknown; use one of {sorted(_DTYPES)}")
        if config.max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens={config.max_new_tokens} must be >= 1")
        if config.temperature < 0 or not (0 < config.top_p <= 1):
            raise ConfigError("model.temperature must be >= 0 and model.top_p in (0, 1]")
        if config.prefill_chunk_tokens < 1:
            raise ConfigError(f"model.prefill_chunk_tokens={config.prefill_chunk_tokens} must be >= 1")
        if not 0 <= config.nice <= 19:
            raise ConfigError(f"model.nice={config.nice} must be between 0 (leave the thread as it is) and 19")
        if config.kv_cache_dtype not in _KV_DTYPES:
            raise ConfigError(f"model.kv_cache_dtype={config.kv_cache_dtype!r} is unknown; use one of {list(_KV_DTYPES)}")
        #: Longest piece of prompt fed in one forward call (an image is never split; one larger
        #: image is fed whole). Bounds how long one layer's attention slice or projection runs.
        self.prefill_chunk_tokens = config.prefill_chunk_tokens
        path = _local_dir(config.path, "model.path", required=True)
        t0 = time.perf_counter()
        self.processor = load_processor(path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.model = _load_model(path, self._dtype, self._device)
        if config.adapter is not None:
            self.model = _load_adapter(self.model, _local_dir(config.adapter, "model.adapter", required=True))
        self.model.eval()
        cpu_attention = self._device.type == "cpu" and _use_cpu_attention(self.model)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        #: The dtype cached keys and values are stored in, or None for the model's own.
        self.kv_dtype = _kv_cache_dtype(config.kv_cache_dtype, base.dtype, cpu_attention)
        self._hf_config = base.config
        params = _forward_params(base)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._positions = positions_for(self.model)
        self._image_token_id = _image_token_id(self.processor, self._hf_config)
        self._stop_ids = _stop_token_ids(base, self.tokenizer)
        if not self._stop_ids:
            log.warning("%s names no end-of-sequence token: every answer runs to max_new_tokens", path)
        self._gen = torch.Generator(device=self._device).manual_seed(config.seed)
        self._encoder = _PromptEncoder(self.processor, self.tokenizer, self._image_token_id)
        self._encode_lock = threading.Lock()  # the encoder keeps state (its pieces): one encode at a time
        # Cancel points inside the forward: (cancel event, epoch) of the forward call in progress.
        self._watch = None
        self._cancel_points = _install_cancel_hooks(self.model, self._cancel_hook)
        # Prefix cache: the KV cache, one tag per cached token (token id, or (image hash, i) for an
        # image placeholder), and the largest position of each cached token.
        self._cache = None
        self._tags: list = []
        self._pos_max: list[int] = []
        self._tries: dict = {}  # plan choices -> their token trie (a few recent vocabularies)
        log.info(
            "hf backend: %s%s on %s (%s%s) loaded in %.1f s; %d cancel points",
            path,
            f" + adapter {config.adapter}" if config.adapter else "",
            self._device,
            config.dtype,
            f", keys and values cached in {str(self.kv_dtype).removeprefix('torch.')}" if self.kv_dtype else "",
            time.perf_counter() - t0,
            self._cancel_points,
        )

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt, *, cancel: threading.Event,
                 plan_choices: Optional[Sequence[str]] = None) -> Iterator[str]:
        """See :meth:`Backend.generate`. With ``plan_choices`` (and ``model.constrain_plans``), what
        the model writes between ``<|plan_start|>`` and ``<|plan_end|>`` is one of them."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
        stats = GenerationStats()
        self.last_stats = stats
        guide = self._plan_guide(plan_choices) if plan_choices and self.config.constrain_plans else None
        return self._generate(prompt, cancel, epoch, stats, guide)

    def close(self) -> None:
        with self._lock:
            self._epoch += 1
            self._drop_cache()
            self.model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def reset_cache(self) -> None:
        """Forget the cached prefix (the next call prefills its whole prompt)."""
        with self._lock:
            self._drop_cache()

    # ------------------------------------------------------------------ generation

    def _generate(self, prompt: Prompt, cancel: threading.Event, epoch: int, stats: GenerationStats,
                  guide: Optional["_PlanGuide"] = None):
        cfg = self.config
        if self.model is None:
            raise BackendError("the hf backend was closed")
        watch = (cancel, epoch)
        stop = "cancel"
        self._lower_priority()
        try:
            # ---- encode (only the pieces of the prompt not encoded before)
            t0 = time.perf_counter()
            try:
                with self._encode_lock:
                    enc = self._encoder.encode(prompt, lambda: self._check(watch))
            except _Cancelled:
                stop = "superseded" if self._epoch != epoch else "cancel"
                return
            except (ValueError, TypeError, KeyError) as exc:
                raise BackendError(f"hf backend: cannot encode the prompt: {exc}") from exc
            finally:
                stats.extra["process_ms"] = _ms(t0)
            n = len(enc.ids)
            stats.prompt_tokens = n
            if guide is not None and n:  # a continued answer may end inside a plan
                guide.push(enc.ids[-1])
            stats.extra.update(images=enc.n_images, encoding=enc.mode)
            detok = _Detokenizer(self.tokenizer)
            # ---- prefill (only the part of the prompt not already cached)
            t1 = time.perf_counter()
            with self._lock:
                if self._epoch != epoch:
                    stop = "superseded"
                    return
                start = self._reuse(enc)
            stats.cached_tokens = start
            logits = None
            try:
                for a, b in _chunks(start, n, enc.spans, self.prefill_chunk_tokens):
                    if cancel.is_set():
                        return
                    with self._lock:
                        if self._epoch != epoch:
                            stop = "superseded"
                            return
                        logits = self._prefill(enc, a, b, watch)
            except _Cancelled:
                stop = "superseded" if self._epoch != epoch else "cancel"
                return
            finally:
                stats.prefill_ms = _ms(t1)
            if cancel.is_set():
                return
            # ---- decode
            t2 = time.perf_counter()
            try:
                while True:
                    next_id = self._select(logits, guide.allowed() if guide is not None else None)
                    if guide is not None:
                        guide.push(next_id)
                    if next_id in self._stop_ids:
                        stop = "eos"
                        break
                    stats.new_tokens += 1
                    delta = detok.push(next_id)
                    if delta:
                        yield delta
                    if stats.new_tokens >= cfg.max_new_tokens:
                        stop = "length"
                        break
                    if cancel.is_set():
                        break
                    with self._lock:
                        if self._epoch != epoch:
                            stop = "superseded"
                            break
                        try:
                            logits = self._step(next_id, watch)
                        except _Cancelled:
                            stop = "superseded" if self._epoch != epoch else "cancel"
                            break
                    if cancel.is_set():
                        break
                tail = detok.flush() if stop in ("eos", "length") else ""
                if tail:
                    yield tail
            finally:
                stats.decode_ms = _ms(t2)
        except BackendError:
            stop = "error"
            raise
        except torch.cuda.OutOfMemoryError as exc:
            stop = "error"
            self.reset_cache()
            raise BackendError(
                f"hf backend: out of GPU memory ({exc}); lower model.max_new_tokens or the number of images"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - the cache may be half-updated: drop it, report
            stop = "error"
            self.reset_cache()
            raise BackendError(f"hf backend: the model failed: {type(exc).__name__}: {exc}") from exc
        finally:
            stats.cancelled = stop == "cancel"
            stats.extra["stop"] = stop
            log.debug(
                "hf step: %d prompt tokens (%d cached), %d new, prefill %.0f ms, decode %.0f ms, stop=%s",
                stats.prompt_tokens,
                stats.cached_tokens,
                stats.new_tokens,
                stats.prefill_ms,
                stats.decode_ms,
                stop,
            )

    def _lower_priority(self) -> None:
        """Lower the calling thread (the one that runs the model) to ``config.nice`` (Linux only)."""
        nice = self.config.nice
        if nice <= 0 or not sys.platform.startswith("linux"):
            return
        tid = threading.get_native_id()
        try:  # on Linux the nice value is per thread; raising it needs no privilege, lowering it back does
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                log.debug("the thread running the model (%d) now runs at nice %d", tid, nice)
        except OSError as exc:
            log.debug("cannot lower the model thread's priority: %s", exc)

    def _reuse(self, enc: _Encoded) -> int:
        """Crop the cache to the longest reusable prefix of ``enc``; return its length."""
        if not self.config.prefix_cache or self._cache is None:
            self._drop_cache()
            return 0
        old, tags = self._tags, enc.tags
        p = _common_prefix(old, tags, min(len(old), len(tags) - 1))  # keep >= 1 token to feed: its logits
        for a, b, _ in enc.spans:  # never start inside an image: it is fed whole
            if a < p < b:
                p = a
        try:
            _crop(self._cache, len(old) - p)
        except (RuntimeError, ValueError) as exc:  # e.g. a sliding-window layer past its window
            log.warning("cannot crop the KV cache (%s); recomputing the prompt", exc)
            self._drop_cache()
            return 0
        del self._tags[p:]
        del self._pos_max[p:]
        return p

    def _prefill(self, enc: _Encoded, a: int, b: int, watch):
        """Feed prompt tokens [a, b) (with the pixels of the images among them)."""
        ids = torch.tensor([enc.ids[a:b]], device=self._device)
        kwargs = {}
        inside = [inputs for s, e, inputs in enc.spans if a <= s and e <= b]
        mm = enc.arrays.get("mm_token_type_ids")
        mm = torch.tensor([mm[a:b]], device=self._device) if mm is not None else None
        if inside:
            kwargs.update(_merge_inputs(inside, self._device, self._dtype))
            if mm is not None:
                kwargs["mm_token_type_ids"] = mm
        grid = kwargs.get("image_grid_thw")
        start = self._pos_max[-1] + 1 if self._pos_max else 0
        pos, pos_max = self._positions.piece(ids, start, mm_token_type_ids=mm, image_grid_thw=grid)
        logits = self._forward(ids, pos, watch, **kwargs)
        self._tags.extend(enc.tags[a:b])
        self._pos_max.extend(pos_max)
        return logits

    def _step(self, token_id: int, watch):
        """Feed one generated token."""
        start = self._pos_max[-1] + 1 if self._pos_max else 0
        ids = torch.tensor([[token_id]], device=self._device)
        logits = self._forward(ids, self._positions.decode(start, self._device), watch)
        self._tags.append(token_id)
        self._pos_max.append(start)
        return logits

    def _forward(self, ids, position_ids, watch, **kwargs):
        if self._cache is None:
            self._cache = _new_cache(self._hf_config, self.kv_dtype)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        kwargs[self._cache_kw] = self._cache
        self._watch = watch
        _checkpoint.fn = self._cancel_point
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True, **kwargs)
        except _Cancelled:
            self._rollback()
            raise
        finally:
            self._watch = None
            _checkpoint.fn = None
        return out.logits[0, -1].float()

    def _check(self, watch) -> None:
        """Raise :class:`_Cancelled` when the generation of ``watch`` (cancel event, epoch) must stop."""
        if watch[0].is_set() or watch[1] != self._epoch:
            raise _Cancelled

    def _cancel_point(self) -> None:
        """A cancel point inside the forward call in progress (the hooks, the attention slices)."""
        watch = self._watch
        if watch is not None and (watch[0].is_set() or watch[1] != self._epoch):
            raise _Cancelled

    def _cancel_hook(self, module, args) -> None:
        """Forward pre-hook on the model's blocks."""
        self._cancel_point()

    def _rollback(self) -> None:
        """After an interrupted forward: crop every cache layer back to the last complete position."""
        keep = len(self._tags)
        try:
            for layer in self._cache.layers:
                extra = layer.get_seq_length() - keep
                if extra > 0:
                    layer.crop(-extra)
        except (AttributeError, RuntimeError, ValueError) as exc:  # a layer that cannot be cropped
            log.warning("cannot crop the KV cache after a cancel (%s); the next call recomputes the prompt", exc)
            self._drop_cache()

    def _plan_guide(self, choices: Sequence[str]) -> Optional["_PlanGuide"]:
        """A guide for one generation over the token trie of ``choices`` (None: cannot constrain)."""
        key = tuple(choices)
        if key not in self._tries:
            if len(self._tries) >= 8:
                self._tries.pop(next(iter(self._tries)))
            self._tries[key] = _plan_trie(self.tokenizer, key)
        trie = self._tries[key]
        return None if trie is None else _PlanGuide(*trie)

    def _select(self, logits, allowed: Optional[list[int]] = None) -> int:
        cfg = self.config
        if allowed is not None:  # only these tokens may come next (a plan being written)
            idx = torch.as_tensor(allowed, device=logits.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[..., idx] = logits[..., idx]
            logits = masked
        if cfg.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        if cfg.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < cfg.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self._gen)])
        return int(torch.multinomial(probs, 1, generator=self._gen))

    def _drop_cache(self) -> None:
        self._cache = None
        self._tags = []
        self._pos_max = []


# ---------------------------------------------------------------------- constrained plans


def _plan_trie(tokenizer, choices: tuple[str, ...]):
    """``(trie, start_id)`` for :class:`_PlanGuide`, or None when the tags are not single tokens.

    The trie maps token ids to subtrees: each choice as the tokenizer writes it alone (the text
    after a special token is tokenised on its own), then the ``<|plan_end|>`` token, whose subtree
    is empty. A choice whose tokens do not decode back to it is left out.
    """
    ids = {}
    for tag in (fmt.PLAN_START, fmt.PLAN_END):
        enc = tokenizer.encode(tag, add_special_tokens=False)
        if len(enc) != 1:
            log.warning("model.constrain_plans: %s is not one token of this tokenizer; plans are not constrained", tag)
            return None
        ids[tag] = enc[0]
    trie: dict = {}
    kept = 0
    for text in choices:
        toks = tokenizer.encode(text, add_special_tokens=False)
        if not toks or tokenizer.decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
            log.debug("model.constrain_plans: %r does not round-trip through the tokenizer; left out", text)
            continue
        node = trie
        for t in toks:
            node = node.setdefault(t, {})
        node.setdefault(ids[fmt.PLAN_END], {})
        kept += 1
    if not kept:
        log.warning("model.constrain_plans: none of the %d commands round-trips through the tokenizer; plans "
                    "are not constrained", len(choices))
        return None
    return trie, ids[fmt.PLAN_START]


class _PlanGuide:
    """Follows one generation: free text, until ``<|plan_start|>``; then only tokens that continue
    one of the choices, up to ``<|plan_end|>``; then free again."""

    def __init__(self, trie: dict, start_id: int):
        self._trie, self._start = trie, start_id
        self._node: Optional[dict] = None  # None: outside a plan

    def allowed(self) -> Optional[list[int]]:
        return None if self._node is None else list(self._node)

    def push(self, token_id: int) -> None:
        """Follow one token (generated, or the prompt's last)."""
        if self._node is None:
            if token_id == self._start:
                self._node = self._trie
        else:
            self._node = self._node.get(token_id) or None  # the end tag's empty subtree: out of the plan


# ---------------------------------------------------------------------- prompt encoding


@dataclass
class _Encoded:
    """A prompt as the model takes it: token ids, their tags, and where the images are."""

    ids: list[int]
    #: One per token: the token id, or ("img", image hash, k) for the k-th placeholder of an image.
    tags: list
    #: (start, end, model inputs of the images whose placeholders fill [start, end)), in order.
    spans: list[tuple[int, int, dict]]
    #: Per-token inputs besides the ids (e.g. Qwen-VL's mm_token_type_ids).
    arrays: dict[str, list[int]] = field(default_factory=dict)
    n_images: int = 0
    mode: str = "full"


@dataclass
class _Piece:
    """One piece of prompt text (from an added token to the next), processed once."""

    ids: list[int]
    tags: list
    arrays: dict[str, list[int]]
    images: list[tuple[int, int, dict]]  # spans relative to the piece


class _NotSplittable(Exception):
    """This processor's output cannot be assembled from pieces (the reason is the message)."""


class _PromptEncoder:
    """Chat template + processor, incrementally: each piece of the text is processed once.

    See the module docstring. ``mode`` is "check" until a prompt with an image has been encoded
    both ways with the same result, then "incremental"; "full" when the pieces cannot be used.
    """

    def __init__(self, processor, tokenizer, image_token_id):
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_token = getattr(processor, "image_token", None)
        self._splitter = _piece_splitter(tokenizer)
        self.mode = "check" if self._splitter is not None and processor is not tokenizer else "full"
        if self.mode == "full":
            log.info("the processor is encoded whole each step (no added tokens to cut the prompt at)")
        self._pieces: dict = {}  # the pieces of the last prompt, by (text, image hashes)
        self._hashes = weakref.WeakKeyDictionary()  # ImagePart -> content hash

    def encode(self, prompt: Prompt, check=lambda: None) -> _Encoded:
        """Encode ``prompt``; ``check()`` is called between processor calls (it raises to stop)."""
        messages, images = fmt.to_hf_messages(prompt)
        last_is_assistant = prompt[-1].role == "assistant"
        text = self.processor.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not last_is_assistant,
            continue_final_message=last_is_assistant,
        )
        hashes = [self._hash(p) for p in images]
        check()
        if self.mode == "incremental":
            try:
                return self._incremental(text, images, hashes, check)
            except _NotSplittable as exc:  # a prompt unlike the checked ones: stop cutting prompts
                self.mode = "full"
                self._pieces = {}
                log.warning("cannot encode this prompt piece by piece (%s); every step encodes the whole prompt", exc)
        full = self._full(text, images, hashes)
        if self.mode == "check":
            try:
                why = _difference(full, self._incremental(text, images, hashes, check))
            except _NotSplittable as exc:
                why = str(exc)
            if why:
                self.mode = "full"
                self._pieces = {}
                log.warning("encoding the prompt piece by piece differs from a full encoding with this processor "
                            "(%s); every step encodes the whole prompt", why)
            elif images:
                self.mode = "incremental"
                log.debug("incremental prompt encoding checked against a full encoding: identical")
        full.mode = "full" if self.mode == "full" else "check"
        return full

    def _hash(self, part) -> bytes:
        # An ImagePart is immutable (its pixels must not change once sent), so its hash is kept.
        try:
            return self._hashes[part]
        except KeyError:
            h = self._hashes[part] = _image_hash(part.pixels)
            return h
        except TypeError:  # not weak-referenceable: hash every time
            return _image_hash(part.pixels)

    # ---- the whole prompt at once (the reference, and the fallback)

    def _full(self, text: str, images, hashes) -> _Encoded:
        pil = [_to_pil(p.pixels) for p in images]
        kwargs = {"images": pil} if pil else {}
        out = dict(self.processor(text=[text], return_tensors="pt", **kwargs))
        ids = out["input_ids"][0].tolist()
        arrays = _token_arrays(out)
        enc = _Encoded(ids, list(ids), [], arrays, len(images))
        if self.image_token_id is None or not images:
            return enc
        runs = _runs(ids, self.image_token_id)
        if not runs:
            raise ValueError(
                f"the prompt has {len(images)} image(s) but the chat template wrote no image placeholder "
                f"(token id {self.image_token_id}); check the checkpoint's chat template"
            )
        per_image = _split_images(out, len(images)) if len(runs) == len(images) else None
        if per_image is None:
            # Cannot map placeholder tokens to images (tiled images, unknown pixel layout): tag every
            # placeholder with all images' hashes, so any image change breaks the prefix at the first
            # image, and feed all images together (one span).
            key = tuple(hashes)
            enc.tags = [("img", key, k) if t == self.image_token_id else t for k, t in enumerate(ids)]
            enc.spans = [(runs[0][0], runs[-1][1], _image_keys(out))]
            return enc
        for (a, b), h, inputs in zip(runs, hashes, per_image):
            enc.tags[a:b] = [("img", h, k) for k in range(b - a)]
            enc.spans.append((a, b, inputs))
        return enc

    # ---- piece by piece

    def _incremental(self, text: str, images, hashes, check) -> _Encoded:
        bounds = [m.start() for m in self._splitter.finditer(text)]
        if not bounds or bounds[0] != 0:
            bounds.insert(0, 0)
        bounds.append(len(text))
        keys, todo = [], {}
        i = 0
        for a, b in zip(bounds, bounds[1:]):
            piece = text[a:b]
            k = piece.count(self.image_token) if self.image_token and images else 0
            key = (piece, tuple(hashes[i : i + k]))
            if key not in self._pieces and key not in todo:
                todo[key] = (a == 0, images[i : i + k])
            keys.append(key)
            i += k
        if i != len(images):
            raise _NotSplittable(f"{len(images)} images but {i} image placeholders in the text")
        new = self._encode_pieces(todo, check)
        check()
        pieces = {key: self._pieces.get(key) or new[key] for key in keys}
        self._pieces = pieces  # only the current prompt's pieces are kept
        enc = _Encoded([], [], [], {}, len(images), "incremental")
        names = None
        for key in keys:
            p = pieces[key]
            off = len(enc.ids)
            enc.ids.extend(p.ids)
            enc.tags.extend(p.tags)
            enc.spans.extend((off + a, off + b, inputs) for a, b, inputs in p.images)
            if names is None:
                names = set(p.arrays)
                enc.arrays = {name: [] for name in names}
            elif set(p.arrays) != names:
                raise _NotSplittable("the processor's per-token outputs differ between pieces")
            for name, values in p.arrays.items():
                enc.arrays[name].extend(values)
        return enc

    def _encode_pieces(self, todo: dict, check) -> dict:
        """Run the processor on new pieces: text-only ones in one batch, each piece with images alone."""
        out: dict = {}
        batch = [key for key, (first, imgs) in todo.items() if not imgs and not first]
        if batch:
            check()
            res = self.processor(text=[key[0] for key in batch], add_special_tokens=False)
            arrays = {name: res[name] for name in _token_array_names(res)}
            for j, key in enumerate(batch):
                ids = list(res["input_ids"][j])
                out[key] = _Piece(ids, list(ids), {name: list(v[j]) for name, v in arrays.items()}, [])
        for key, (first, imgs) in todo.items():
            if key in out:
                continue
            check()
            kwargs = {} if first else {"add_special_tokens": False}  # the start encodes as the full text does
            if imgs:
                kwargs["images"] = [_to_pil(p.pixels) for p in imgs]
            res = dict(self.processor(text=[key[0]], return_tensors="pt", **kwargs))
            ids = res["input_ids"][0].tolist()
            piece = _Piece(ids, list(ids), _token_arrays(res), [])
            if imgs:
                runs = _runs(ids, self.image_token_id) if self.image_token_id is not None else []
                per_image = _split_images(res, len(imgs)) if len(runs) == len(imgs) else None
                if per_image is None:
                    raise _NotSplittable("the image placeholders or pixel inputs cannot be mapped to single images")
                for (a, b), h, inputs in zip(runs, key[1], per_image):
                    piece.tags[a:b] = [("img", h, k) for k in range(b - a)]
                    piece.images.append((a, b, inputs))
            out[key] = piece
        return out


def _piece_splitter(tokenizer):
    """A regex matching the added tokens a text can be cut before without changing its tokens, or None."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not decoder or backend is None:
        return None
    normalizer = backend.normalizer
    contents = sorted(
        {
            t.content
            for t in decoder.values()
            # A token that eats the space before it, or must stand alone as a word, depends on its
            # left neighbour; a normalised one is matched after normalisation: do not cut there.
            if t.content and not t.lstrip and not t.single_word and (not t.normalized or normalizer is None)
        },
        key=len,
        reverse=True,
    )
    return re.compile("|".join(re.escape(c) for c in contents)) if contents else None


def _token_array_names(out) -> list[str]:
    ids = out["input_ids"]
    names = []
    for name, value in out.items():
        if name in ("input_ids", "attention_mask"):
            continue
        if torch.is_tensor(value):
            if value.shape == ids.shape and not value.is_floating_point():
                names.append(name)
        elif isinstance(value, list) and len(value) == len(ids) and all(
            isinstance(v, list) and len(v) == len(i) for v, i in zip(value, ids)
        ):
            names.append(name)
    return names


def _token_arrays(out) -> dict[str, list[int]]:
    """Per-token outputs of a one-sample processor call (besides input_ids and attention_mask)."""
    return {name: out[name][0].tolist() for name in _token_array_names(out)}


def _image_keys(out) -> dict:
    """The image inputs of a processor output (everything that is not per token)."""
    skip = {"input_ids", "attention_mask", *_token_array_names(out)}
    return {k: v for k, v in out.items() if k not in skip and torch.is_tensor(v)}


def _split_images(out, n_images: int):
    """The image inputs of a processor output, one dict per image; None if the layout is unknown."""
    inputs = _image_keys(out)
    pv = inputs.get("pixel_values")
    if pv is None:
        return None
    per = [{} for _ in range(n_images)]
    grid = inputs.get("image_grid_thw")
    if grid is not None:  # Qwen-VL: pixel_values are all images' patches, concatenated
        if len(grid) != n_images or int(grid.prod(-1).sum()) != pv.shape[0]:
            return None
        off = 0
        for i, count in enumerate(grid.prod(-1).tolist()):
            per[i]["pixel_values"] = pv[off : off + count]
            off += count
    for name, value in inputs.items():
        if grid is not None and name == "pixel_values":
            continue
        if value.dim() == 0 or value.shape[0] != n_images:  # one row per image, or unknown
            return None
        for i in range(n_images):
            per[i][name] = value[i : i + 1]
    return per


def _merge_inputs(parts: list[dict], device, dtype) -> dict:
    """The image inputs of several spans, concatenated, on the device."""
    out = {}
    for name in parts[0]:
        value = parts[0][name] if len(parts) == 1 else torch.cat([p[name] for p in parts])
        if name == "pixel_values" and dtype != "auto":
            out[name] = value.to(device, dtype=dtype)
        else:
            out[name] = value.to(device)
    return out


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of ``token_id`` in ``ids``."""
    runs, i, n = [], 0, len(ids)
    while True:
        try:
            i = ids.index(token_id, i)
        except ValueError:
            return runs
        j = i
        while j < n and ids[j] == token_id:
            j += 1
        runs.append((i, j))
        i = j


def _difference(a: _Encoded, b: _Encoded) -> str:
    """Why two encodings differ ("" when they are the same)."""
    if a.ids != b.ids:
        p = _common_prefix(a.ids, b.ids, min(len(a.ids), len(b.ids)))
        return f"token ids differ from position {p} ({len(a.ids)} vs {len(b.ids)} tokens)"
    if a.tags != b.tags:
        return "image placeholders differ"
    if a.arrays != b.arrays:
        return f"per-token inputs differ ({sorted(a.arrays)} vs {sorted(b.arrays)})"
    if [s[:2] for s in a.spans] != [s[:2] for s in b.spans]:
        return "image spans differ"
    for (_, _, x), (_, _, y) in zip(a.spans, b.spans):
        if set(x) != set(y) or not all(x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x):
            return "pixel inputs differ"
    return ""


def _common_prefix(a: list, b: list, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit`` (compared in blocks, in C)."""
    p, block = 0, 256
    while p < limit:
        q = min(p + block, limit)
        if a[p:q] == b[p:q]:
            p = q
            continue
        while a[p] == b[p]:
            p += 1
        return p
    return limit


def _cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention with two CPU fast paths for grouped-query attention.

    Stock ``sdpa`` on CPU lets the kernel broadcast each key/value head to its query heads
    (``enable_gqa``) when there is no mask, and copies the keys and values once per query head
    (``repeat_kv``) when there is one. Both cost time proportional to the context at every call:

    - a decoding step (one query token, no mask): the query heads that share a key/value head
      are stacked as queries of that head, so each cached key and value is read once instead
      of once per query head (same arithmetic; ~1.6x faster at 6k tokens of context);
    - a prefill piece after a cached prefix (a mask): ``enable_gqa`` with the mask, no copy;
      and, inside a backend's forward call, in slices of :data:`_ATTENTION_SLICE` query rows with
      a cancel point between them, since one such call over a long context is the longest
      stretch of a prefill without a hook (the same arithmetic, ~0-10% slower).

    Anything else goes to transformers' own ``sdpa_attention_forward`` unchanged. Keys and values
    cached in another dtype (``model.kv_cache_dtype``) are attended to in theirs: the query goes
    to it and the output comes back to the query's.
    """
    if key.dtype != query.dtype:
        dtype = query.dtype
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(key.dtype)
        out, weights = _cpu_attention(
            module, query.to(key.dtype), key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
        return out.to(dtype), weights
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups > 1
        and dropout == 0.0
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and key.shape[1] * groups == query.shape[1]
    ):
        b, h, q_len, d = query.shape
        if q_len == 1 and attention_mask is None:
            out = _F.scaled_dot_product_attention(query.reshape(b, h // groups, groups, d), key, value, scale=scaling)
            return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1:
            check = getattr(_checkpoint, "fn", None)
            step = _ATTENTION_SLICE if check is not None and q_len > _ATTENTION_SLICE else q_len
            outs = []
            for i in range(0, q_len, step):
                if check is not None:
                    check()
                mask = attention_mask[:, :, i : i + step] if attention_mask.shape[2] > 1 else attention_mask
                outs.append(
                    _F.scaled_dot_product_attention(
                        query[:, :, i : i + step], key, value, attn_mask=mask, scale=scaling, enable_gqa=True
                    )
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            return out.transpose(1, 2).contiguous(), None
    return _sdpa_attention(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


_KV_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")


def _kv_cache_dtype(name: str, model_dtype, cpu_attention: bool):
    """``model.kv_cache_dtype`` resolved: the dtype to cache keys and values in, or None for the model's."""
    if name == "model":
        return None
    if name == "auto":
        return torch.bfloat16 if cpu_attention and model_dtype == torch.float32 and _native_bfloat16() else None
    dtype = _DTYPES[name]
    if dtype == model_dtype:
        return None
    if not cpu_attention:
        raise ConfigError(
            f"model.kv_cache_dtype={name} differs from the model's {model_dtype} and needs the CPU attention "
            "path (model.device cpu and a model on sdpa attention); use 'model' or 'auto'"
        )
    return dtype


def _native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def _use_cpu_attention(model) -> bool:
    """Switch a CPU model from ``sdpa`` to :func:`_cpu_attention` (registered with transformers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        transformers.AttentionInterface.register(_CPU_ATTENTION, _cpu_attention)
        AttentionMaskInterface.register(_CPU_ATTENTION, sdpa_mask)  # the masks sdpa gets
        base.set_attn_implementation(_CPU_ATTENTION)
    except (ValueError, AttributeError, TypeError, ImportError) as exc:  # a model outside the AttentionInterface
        log.debug("keeping sdpa attention: %s", exc)
        return False
    return True


_CPU_ATTENTION = "robix_cpu_sdpa"
#: Query rows per attention call of a prefill piece on CPU, between two cancel points.
_ATTENTION_SLICE = 32
#: The cancel point of the forward call running in this thread (set by HFBackend._forward).
_checkpoint = threading.local()


def _install_cancel_hooks(model, hook) -> int:
    """Put ``hook`` as a forward pre-hook on the model's repeated blocks, their children and
    grandchildren, and their neighbours; return how many modules got it."""
    names: set = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # no declared blocks: the members of every list of same-type modules
        for m in model.modules():
            if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
                blocks.extend(m)
    points = []
    for block in blocks:
        points.append(block)
        for child in block.children():  # attention, MLP, norms, and their parts (the projections):
            points.append(child)  # the longest stretch without a check is one projection's matmul
            points.extend(child.children())
    # The blocks' neighbours in the module that holds them (embeddings, rotary tables, patch
    # embedding, merger, final norm): cancel points in the work before and after the blocks.
    block_ids = {id(b) for b in blocks}
    for owner in model.modules():
        children = list(owner.children())
        if any(isinstance(c, torch.nn.ModuleList) and any(id(x) in block_ids for x in c) for c in children):
            points.extend(c for c in children if not isinstance(c, torch.nn.ModuleList))
    seen = set()
    for m in points:
        if id(m) not in seen:
            seen.add(id(m))
            m.register_forward_pre_hook(hook)
    if not seen:
        log.warning("found no layers to check for a cancel inside the forward pass; a cancel waits for the "
                    "forward call in progress (lower model.prefill_chunk_tokens to bound it)")
    return len(seen)


# ---------------------------------------------------------------------- helpers


class _Detokenizer:
    """Incremental decoding: yields text only once it is stable (no half UTF-8 character).

    Decodes a short window (``prefix``..end) and emits what the last token added, so the cost per
    token is constant and tokenizers that strip a leading space (sentencepiece) decode correctly.
    Special tokens that are not stop tokens (e.g. ``<|think_start|>``) are kept in the text.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]


def _chunks(start: int, end: int, spans, size: int):
    """Split [start, end) into pieces of <= size tokens without cutting an image span."""
    a = start
    while a < end:
        b = min(a + size, end)
        for s, e, _ in spans:
            if s < b < e:  # b falls inside an image
                b = s if s > a else e
        yield a, b
        a = b


def _new_cache(config, dtype=None):
    """A ``DynamicCache`` whose full-attention layers grow in place (see :class:`_GrowingLayer`),
    storing keys and values in ``dtype`` (None: as they come)."""
    cache = transformers.DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [_GrowingLayer(dtype) if type(layer) is _DynamicLayer else layer for layer in layers]
    return cache


class _GrowingLayer(_DynamicLayer):
    """A ``DynamicLayer`` that writes new keys/values into a buffer with spare room.

    The stock layer concatenates the whole cache with each new token (a copy that grows with the
    context: about a third of a decoding step on CPU at 4k tokens); here the buffer doubles when
    full and ``keys``/``values`` are views of its filled part, so a step copies only the new token
    and cropping is a length change. With ``dtype`` set, keys and values are stored (and
    returned) in it.
    """

    _kbuf = _vbuf = None
    _len = 0

    def __init__(self, dtype=None):
        super().__init__()
        self._store = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        if self._store is not None:
            key_states, value_states = key_states.to(self._store), value_states.to(self._store)
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
            self._kbuf = self._vbuf = None
            self._len = 0
        n = key_states.shape[-2]
        end = self._len + n
        if self._kbuf is None or end > self._kbuf.shape[-2]:
            cap = max(end, 2 * (self._kbuf.shape[-2] if self._kbuf is not None else 0), 256)
            kbuf = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
            vbuf = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
            if self._len:
                kbuf[..., : self._len, :] = self._kbuf[..., : self._len, :]
                vbuf[..., : self._len, :] = self._vbuf[..., : self._len, :]
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., self._len : end, :] = key_states
        self._vbuf[..., self._len : end, :] = value_states
        self._len = end
        self.keys = self._kbuf[..., :end, :]
        self.values = self._vbuf[..., :end, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove)")
        if tokens_to_remove == 0 or not self.is_initialized or self._kbuf is None:
            return
        self._len = max(0, self._len + tokens_to_remove)
        self.keys = self._kbuf[..., : self._len, :]
        self.values = self._vbuf[..., : self._len, :]

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0
        super().reset()


def _crop(cache, remove: int) -> None:
    if remove > 0:
        cache.crop(-remove)  # transformers 5: a negative count removes that many tokens


def _image_hash(pixels) -> bytes:
    arr = np.ascontiguousarray(pixels)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(memoryview(arr).cast("B"))
    return h.digest()


def _to_pil(pixels):
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an ImagePart must be an (H, W, 3) uint8 RGB array, got {arr.shape} {arr.dtype}")
    return Image.fromarray(arr)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _resolve_device(name: str):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device={name!r} is not a torch device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but CUDA is not available here; set model.device=cpu")
    return device


def _local_dir(value, key: str, *, required: bool) -> Path:
    if not value:
        raise ConfigError(
            f"model.backend='hf' needs {key}: a local directory with a transformers checkpoint "
            f"(e.g. {key}=/models/Qwen2.5-VL-3B-Instruct); nothing is downloaded. "
            "Set it, or use model.backend=scripted / openai"
        )
    path = Path(value).expanduser()
    if not path.is_dir() and value in SHIPPED_MODELS:
        path = shipped_model_dir(value)
    if not path.is_dir():
        raise ConfigError(f"{key}={value!r} is not a directory; set {key} to a local checkpoint directory"
                          f" (or one of the shipped models: {', '.join(sorted(SHIPPED_MODELS))})")
    return path


#: model.path names of the checkpoints that ship inside the package (a directory of that name wins).
SHIPPED_MODELS = {"robix-tiny": "models/robix_tiny/checkpoint"}


def shipped_model_dir(name: str) -> Path:
    """The directory of the shipped checkpoint ``name`` (a key of :data:`SHIPPED_MODELS`)."""
    import robix_planner

    return Path(robix_planner.__file__).parent / SHIPPED_MODELS[name]


def _forward_params(model) -> set:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def load_processor(path: Path):
    """The processor of the checkpoint at ``path``, from local files only (robix-tiny registered first).

    Qwen-VL processors whose video processor needs torchvision load with their image processor
    and tokenizer only. Used by the training stages too, so that training and serving process alike.
    """
    import robix_planner.models  # noqa: F401 - registers robix-tiny with the Auto classes
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - retried below or reported with the cause
        first = exc
    # Qwen-VL processors also load a video processor, which needs torchvision. Without it, load
    # the same processor class with only its image processor and tokenizer.
    cls = _processor_class(path)
    if cls is not None and "video_processor" in cls.get_attributes():
        try:
            proc = _image_only(cls).from_pretrained(path, local_files_only=True)
            log.info("loaded %s without its video processor (%s)", cls.__name__, first)
            return proc
        except Exception as exc:  # noqa: BLE001
            log.debug("image-only processor failed too: %s", exc)
    raise ConfigError(f"model.path={str(path)!r}: cannot load its processor ({first})") from first


def _processor_class(path: Path):
    name = None
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / fname
        if f.is_file():
            try:
                name = json.loads(f.read_text()).get("processor_class")
            except (OSError, ValueError):
                continue
            if name:
                break
    if not name:
        try:
            from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            name = PROCESSOR_MAPPING_NAMES.get(model_type)
        except (OSError, ValueError, ImportError):
            return None
    cls = getattr(transformers, name, None) if name else None
    return cls if isinstance(cls, type) else None


_IMAGE_ONLY: dict = {}


def _image_only(cls):
    """``cls`` (a processor with a video processor) with only its image processor and tokenizer."""
    if cls not in _IMAGE_ONLY:

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        _IMAGE_ONLY[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})
    return _IMAGE_ONLY[cls]


def _load_model(path: Path, dtype, device):
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"model.path={str(path)!r}: cannot load it with AutoModelForImageTextToText ({exc}); "
            "model.backend='hf' needs a vision-language checkpoint in the transformers layout"
        ) from exc
    return model.to(device)


def _load_adapter(model, adapter: Path):
    try:
        from peft import PeftModel
    except ModuleNotFoundError:
        raise ConfigError(
            "model.adapter is set but peft is not installed; pip install 'robix-planner[model]' or unset model.adapter"
        ) from None
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.adapter={str(adapter)!r}: cannot load the peft adapter ({exc})") from exc


def _image_token_id(processor, config):
    tid = getattr(processor, "image_token_id", None)
    if tid is None:
        tid = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    return tid


def _stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids}
