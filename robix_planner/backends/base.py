"""The interface every model backend implements, and what it consumes.

A backend turns a :data:`Prompt` (chat messages whose content mixes text and images)
into a stream of text deltas. It is model-agnostic on purpose: the planner's format
module (:mod:`robix_planner.format`) decides *what* the prompt says and how the output
is tagged; a backend only decides how to feed it to its model (a local transformers
VLM, an OpenAI-compatible server, a script).

Cancellation: :meth:`Backend.generate` gets a ``threading.Event``; when it is set the
stream must end within one decoding step (a local model checks it between tokens; a
server stream is closed, which cancels the request in vLLM and SGLang).
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal, Optional, Sequence, Union

from robix_planner.config import Config

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, eq=False)
class ImagePart:
    """One camera view inside a message: an ``(H, W, 3)`` uint8 RGB numpy array.

    Immutable once made: backends may key caches on the object (its pixels must not change).
    """

    pixels: object  # numpy.ndarray; typed loosely so importing this module needs no numpy
    camera: str = "head"


Part = Union[str, ImagePart]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The text parts joined (images left out)."""
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]


#: What a backend consumes: system, then alternating user / assistant turns.
Prompt = list[ChatMessage]


class ModelConfig(Config):
    """Which model answers, and how. One section of the planner's config tree."""

    #: "hf" (local transformers VLM), "openai" (OpenAI-compatible server), "scripted"
    #: (replays ``outputs``), or "package.module:Class" for any other Backend subclass.
    backend: str = "scripted"
    #: hf: a local directory in the transformers layout (nothing is downloaded).
    path: Optional[str] = None
    #: hf: an optional peft (LoRA) adapter directory applied on top of ``path``.
    adapter: Optional[str] = None
    #: hf: "cpu", "cuda", "auto".
    device: str = "cpu"
    #: hf: "float32", "bfloat16", "float16", "auto".
    dtype: str = "float32"
    #: hf: reuse the KV cache of the unchanged prompt prefix from step to step.
    prefix_cache: bool = True
    #: hf: the longest piece of prompt fed to the model in one forward call (an image is never
    #: split). On CPU a cancel lands within one attention slice or projection of one layer; the
    #: piece size bounds a projection (on a GPU, the whole forward call); smaller pieces cost
    #: more forward calls.
    prefill_chunk_tokens: int = 128
    #: hf: the dtype the cached keys and values are stored, and attention computed, in. "model"
    #: (default): the model's own, so outputs equal transformers' ``generate``. On CPU, with the
    #: model in float32: "bfloat16" halves the memory each decoded token reads from the cache and
    #: speeds up attention over a long history where the CPU has native bfloat16 (AVX512-BF16 or
    #: AMX); answers can differ where two tokens are nearly tied. "auto": "bfloat16" on such a
    #: CPU, else "model". "float16" / "float32" are accepted too.
    kv_cache_dtype: str = "model"
    #: hf: when the caller passes the controller's commands (the planner and ``robix eval offline``
    #: do), decode the text between ``<|plan_start|>`` and ``<|plan_end|>`` constrained to them, so
    #: that a plan is always a command the controller understands. Needs both tags to be single
    #: tokens of the tokenizer (robix-tiny's are; a checkpoint fine-tuned with our data gets them).
    constrain_plans: bool = True
    #: hf (Linux): the nice value (0-19) the thread that runs the model is lowered to when it
    #: runs a generation (never raised back). Above 0, the node's own threads (the bus, a halt,
    #: a cancel) preempt the model at once when CPU cores are scarce; 0 leaves the thread alone.
    nice: int = 10
    #: openai: server base URL (e.g. http://127.0.0.1:8000/v1) and the served model name.
    base_url: Optional[str] = None
    model: Optional[str] = None
    #: openai: name of the environment variable holding the API key (never the key itself).
    api_key_env: Optional[str] = None
    #: openai: seconds to wait for the first byte / between chunks.
    timeout_s: float = 60.0
    #: scripted: the raw model outputs to replay, one per call (the last repeats).
    outputs: tuple[str, ...] = ()
    #: scripted: seconds between streamed chunks (simulates decoding speed).
    chunk_delay_s: float = 0.0
    #: decoding
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


class BackendError(RuntimeError):
    """A backend could not answer (server down, model failed). The planner reports it to the user."""


@dataclass
class GenerationStats:
    """Filled in by a backend during :meth:`Backend.generate` (for PlannerStep timings)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous step
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    cancelled: bool = False
    extra: dict = field(default_factory=dict)


class Backend(abc.ABC):
    """A model that streams text for a prompt and can be cancelled mid-generation."""

    #: True when :meth:`generate` takes ``plan_choices``: the command texts a plan may be (the
    #: controller's grammar and vocabulary, :func:`robix_planner.skills.commands`). Such a backend
    #: may constrain its decoding so that whatever it writes between ``<|plan_start|>`` and
    #: ``<|plan_end|>`` is one of them. Callers pass the keyword only to backends that set this.
    accepts_plan_choices: ClassVar[bool] = False

    def __init__(self, config: ModelConfig):
        self.config = config
        self.last_stats = GenerationStats()

    @abc.abstractmethod
    def generate(self, prompt: Prompt, *, cancel: threading.Event) -> Iterator[str]:
        """Yield text deltas. Stop within one decoding step once ``cancel`` is set.

        A backend with :attr:`accepts_plan_choices` also takes ``plan_choices: Sequence[str] | None``.

        Sets :attr:`last_stats`. Raises :class:`BackendError` when the model cannot answer.
        """

    def close(self) -> None:
        """Release the model or connection."""


def stream(backend: Backend, prompt: Prompt, *, cancel: threading.Event,
           plan_choices: Optional[Sequence[str]] = None) -> Iterator[str]:
    """``backend.generate(prompt, cancel=cancel)``, with ``plan_choices`` passed on only to a backend
    that takes them (:attr:`Backend.accepts_plan_choices`)."""
    if plan_choices is not None and getattr(backend, "accepts_plan_choices", False):
        return backend.generate(prompt, cancel=cancel, plan_choices=plan_choices)
    return backend.generate(prompt, cancel=cancel)
