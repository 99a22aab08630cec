"""The ``hf`` backend: a local transformers VLM, streamed token by token, cancellable, with prefix reuse.

Loading (nothing is downloaded; every ``from_pretrained`` gets ``local_files_only=True``)::

    model:
      backend: hf
      path: /models/Qwen2.5-VL-3B-Instruct     # a directory in the transformers layout
      adapter: /runs/sft/adapter               # optional peft (LoRA) adapter on top
      device: cuda                             # cpu | cuda | cuda:1 | auto
      dtype: bfloat16                          # float32 | bfloat16 | float16 | auto (the checkpoint's)

``AutoProcessor`` + ``AutoModelForImageTextToText`` load the checkpoint. Qwen-VL processors also
want a video processor, which needs torchvision; when torchvision is missing the processor is
loaded without it (images only, through the Pillow image processor), which is all the planner
needs.

Decoding is a hand-written loop over the model's forward with a ``DynamicCache``: greedy when
``temperature == 0``, else temperature + top-p sampling from a generator seeded with ``seed``.
It stops at an end-of-sequence token (``generation_config.eos_token_id`` and the tokenizer's),
after ``max_new_tokens``, or when ``cancel`` is set. ``cancel`` is checked before and after every
forward call (each decoding step, each prefill chunk of at most :attr:`HFBackend.prefill_chunk_tokens`
tokens), so generation ends at most one forward call after it is set, and no token computed
after the cancel is yielded. (``model.generate`` with a StoppingCriteria would also stop after
one step, but a streamer thread and a stopping criterion only see whole steps, and ``generate``
keeps no cache we could crop and reuse for the next prompt; the manual loop does both.)

Prefix reuse (``prefix_cache: true``): the backend keeps the tokens whose keys and values are in
the cache, each tagged with its image (a content hash) when it is an image placeholder. For the
next prompt it takes the longest common prefix of the two tag sequences (an image whose pixels
changed breaks the prefix at its first token, even though its placeholder tokens are identical),
crops the cache to it, and prefills only the suffix, with the pixel inputs of only the images in
the suffix. Positions of the suffix continue the prefix's, including Qwen-VL's 3-D multimodal
RoPE (see :mod:`robix_planner.backends.qwen_vl`). The per-step cost is then that of the suffix
(the new observation and utterance) plus the decoding, not of the whole history, as long as the
prompt only grows at the end. Changing an early token (dropping an old image from the middle of
the history) recomputes everything after it.

``last_stats`` reports prompt_tokens, cached_tokens, new_tokens, prefill_ms, decode_ms, cancelled,
and in ``extra``: ``process_ms`` (chat template + processor), ``stop`` ("eos" | "length" |
"cancel" | "superseded"), ``images``.

One backend serves one planner: a new :meth:`HFBackend.generate` supersedes a generation that is
still running (the old one stops after its current step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Iterator

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
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(
        f"model.backend='hf' needs torch and transformers ({exc}); install them with "
        "pip install 'robix-planner[model]' or use model.backend=openai|scripted"
    ) from None

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class HFBackend(Backend):
    """A local transformers VLM behind the :class:`Backend` interface."""

    #: Longest piece of prompt fed in one forward call (an image is never split; one larger image
    #: is fed whole). Bounds the time to react to ``cancel`` during a long prefill.
    prefill_chunk_tokens: int = 512

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
        path = _local_dir(config.path, "model.path", required=True)
        t0 = time.perf_counter()
        self.processor = _load_processor(path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.model = _load_model(path, self._dtype, self._device)
        if config.adapter is not None:
            self.model = _load_adapter(self.model, _local_dir(config.adapter, "model.adapter", required=True))
        self.model.eval()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
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
        # Prefix cache: the KV cache, one tag per cached token (token id, or (image hash, i) for an
        # image placeholder), and the largest position of each cached token.
        self._cache = None
        self._tags: list = []
        self._pos_max: list[int] = []
        log.info(
            "hf backend: %s%s on %s (%s) loaded in %.1f s",
            path,
            f" + adapter {config.adapter}" if config.adapter else "",
            self._device,
            config.dtype,
            time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt, *, cancel: threading.Event) -> Iterator[str]:
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
        stats = GenerationStats()
        self.last_stats = stats
        return self._generate(prompt, cancel, epoch, stats)

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

    def _generate(self, prompt: Prompt, cancel: threading.Event, epoch: int, stats: GenerationStats):
        cfg = self.config
        if self.model is None:
            raise BackendError("the hf backend was closed")
        t0 = time.perf_counter()
        try:
            inputs, images = self._encode(prompt)
            tags, spans = self._tag(inputs["input_ids"], inputs, images)
        except (ValueError, TypeError, KeyError) as exc:
            raise BackendError(f"hf backend: cannot encode the prompt: {exc}") from exc
        n = len(tags)
        stats.prompt_tokens = n
        stats.extra.update(images=len(images), process_ms=_ms(t0))
        detok = _Detokenizer(self.tokenizer)
        stop = "cancel"
        try:
            # ---- prefill (only the part of the prompt not already cached)
            t1 = time.perf_counter()
            with self._lock:
                if self._epoch != epoch:
                    stop = "superseded"
                    return
                start = self._reuse(tags, spans)
            stats.cached_tokens = start
            logits = None
            for a, b in _chunks(start, n, spans, self.prefill_chunk_tokens):
                if cancel.is_set():
                    return
                with self._lock:
                    if self._epoch != epoch:
                        stop = "superseded"
                        return
                    logits = self._prefill(inputs, spans, a, b, tags)
                stats.prefill_ms = _ms(t1)
            if cancel.is_set():
                return
            # ---- decode
            t2 = time.perf_counter()
            try:
                while True:
                    next_id = self._select(logits)
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
                        logits = self._step(next_id)
                    if cancel.is_set():
                        break
                tail = detok.flush() if stop in ("eos", "length") else ""
                if tail:
                    yield tail
            finally:
                stats.decode_ms = _ms(t2)
        except torch.cuda.OutOfMemoryError as exc:
            self.reset_cache()
            raise BackendError(
                f"hf backend: out of GPU memory ({exc}); lower model.max_new_tokens or the number of images"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - the cache may be half-updated: drop it, report
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

    def _encode(self, prompt: Prompt):
        """Chat template + processor: token ids (1, n) and pixel inputs for every image in order."""
        messages, images = fmt.to_hf_messages(prompt)
        last_is_assistant = prompt[-1].role == "assistant"
        text = self.processor.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not last_is_assistant,
            continue_final_message=last_is_assistant,
        )
        pil = [_to_pil(p.pixels) for p in images]
        kwargs = {"images": pil} if pil else {}
        inputs = self.processor(text=[text], return_tensors="pt", **kwargs)
        return dict(inputs), images

    def _tag(self, ids, inputs, images):
        """One tag per prompt token, and the (start, end, image index) span of each image."""
        flat = ids[0].tolist()
        if self._image_token_id is None or not images:
            return flat, []
        runs, i = [], 0
        while i < len(flat):
            if flat[i] == self._image_token_id:
                j = i
                while j < len(flat) and flat[j] == self._image_token_id:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        if not runs:
            raise ValueError(
                f"the prompt has {len(images)} image(s) but the chat template wrote no image placeholder "
                f"(token id {self._image_token_id}); check the checkpoint's chat template"
            )
        if len(runs) != len(images) or not _per_image_inputs(inputs, len(images)):
            # Cannot map placeholder tokens to images (tiled images, unknown pixel layout): tag every
            # placeholder with all images' hashes, so any image change breaks the prefix at the first
            # image, and feed all images together (one span).
            key = tuple(_image_hash(p.pixels) for p in images)
            first, last = runs[0][0], runs[-1][1]
            tags = [("img", key, k) if t == self._image_token_id else t for k, t in enumerate(flat)]
            return tags, [(first, last, -1)]
        tags = list(flat)
        spans = []
        for idx, ((a, b), part) in enumerate(zip(runs, images)):
            h = _image_hash(part.pixels)
            for k in range(a, b):
                tags[k] = ("img", h, k - a)
            spans.append((a, b, idx))
        return tags, spans

    def _reuse(self, tags, spans) -> int:
        """Crop the cache to the longest reusable prefix of ``tags``; return its length."""
        if not self.config.prefix_cache or self._cache is None:
            self._drop_cache()
            return 0
        old = self._tags
        p, m = 0, min(len(old), len(tags) - 1)  # keep >= 1 token to feed: its logits start decoding
        while p < m and old[p] == tags[p]:
            p += 1
        for a, b, _ in spans:  # never start inside an image: it is fed whole
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

    def _prefill(self, inputs, spans, a: int, b: int, tags):
        """Feed prompt tokens [a, b) (with the pixels of the images among them)."""
        ids = inputs["input_ids"][:, a:b].to(self._device)
        kwargs = {}
        inside = [s for s in spans if a <= s[0] and s[1] <= b]
        mm = inputs.get("mm_token_type_ids")
        mm = mm[:, a:b].to(self._device) if mm is not None else None
        if inside:
            kwargs.update(_image_inputs(inputs, [s[2] for s in inside], self._device, self._dtype))
            if mm is not None:
                kwargs["mm_token_type_ids"] = mm
        grid = kwargs.get("image_grid_thw")
        start = self._pos_max[-1] + 1 if self._pos_max else 0
        pos, pos_max = self._positions.piece(ids, start, mm_token_type_ids=mm, image_grid_thw=grid)
        logits = self._forward(ids, pos, **kwargs)
        self._tags.extend(tags[a:b])
        self._pos_max.extend(pos_max)
        return logits

    def _step(self, token_id: int):
        """Feed one generated token."""
        start = self._pos_max[-1] + 1 if self._pos_max else 0
        ids = torch.tensor([[token_id]], device=self._device)
        logits = self._forward(ids, self._positions.decode(start, self._device))
        self._tags.append(token_id)
        self._pos_max.append(start)
        return logits

    def _forward(self, ids, position_ids, **kwargs):
        if self._cache is None:
            self._cache = _new_cache(self._hf_config)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        kwargs[self._cache_kw] = self._cache
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
        return out.logits[0, -1].float()

    def _select(self, logits) -> int:
        cfg = self.config
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


def _per_image_inputs(inputs, n_images: int) -> bool:
    """Whether the processor's pixel inputs can be split per image."""
    pv = inputs.get("pixel_values")
    if pv is None:
        return False
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        return len(grid) == n_images and int(grid.prod(-1).sum()) == pv.shape[0]
    return pv.shape[0] == n_images


def _image_inputs(inputs, indices, device, dtype) -> dict:
    """The processor's pixel inputs restricted to the images ``indices`` (-1: all of them)."""
    pv = inputs["pixel_values"]
    grid = inputs.get("image_grid_thw")
    out = {}
    if indices == [-1]:
        sel_pv, rest = pv, {k: v for k, v in inputs.items() if k in ("image_grid_thw", "image_sizes")}
    elif grid is not None:  # Qwen-VL: pixel_values are all images' patches, concatenated
        counts = grid.prod(-1).tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        sel_pv = torch.cat([pv[offsets[i] : offsets[i + 1]] for i in indices])
        rest = {"image_grid_thw": grid[indices]}
    else:  # one row per image
        sel_pv = pv[indices]
        rest = {k: inputs[k][indices] for k in ("image_sizes",) if k in inputs}
    out["pixel_values"] = sel_pv.to(device, dtype=None if dtype == "auto" else dtype)
    for k, v in rest.items():
        out[k] = v.to(device)
    return out


def _new_cache(config):
    """A ``DynamicCache`` whose full-attention layers grow in place (see :class:`_GrowingLayer`)."""
    cache = transformers.DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [_GrowingLayer() if type(layer) is _DynamicLayer else layer for layer in layers]
    return cache


class _GrowingLayer(_DynamicLayer):
    """A ``DynamicLayer`` that writes new keys/values into a buffer with spare room.

    The stock layer concatenates the whole cache with each new token (a copy that grows with the
    context: about a third of a decoding step on CPU at 4k tokens); here the buffer doubles when
    full and ``keys``/``values`` are views of its filled part, so a step copies only the new token
    and cropping is a length change.
    """

    _kbuf = _vbuf = None
    _len = 0

    def update(self, key_states, value_states, *args, **kwargs):
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
    if not path.is_dir():
        raise ConfigError(f"{key}={value!r} is not a directory; set {key} to a local checkpoint directory")
    return path


def _forward_params(model) -> set:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _load_processor(path: Path):
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
