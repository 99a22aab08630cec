"""The ``scripted`` backend: replays given outputs, or asks a Python function, as a stream.

For tests and demos, and for plugging a rule-based planner (the simulator's oracle) in
behind the same interface a trained model uses, so the whole loop runs before a model
exists:

    backend = ScriptedBackend(ModelConfig(outputs=("<|think_start|>…<|think_end|>…",)))
    backend = ScriptedBackend(ModelConfig(), respond=lambda prompt: oracle.answer(prompt))

Each answer is streamed in token-sized pieces (:func:`split_chunks`: a tag such as
``<|plan_start|>`` is one piece, a word with its leading whitespace another), with
``model.chunk_delay_s`` between pieces to imitate decoding speed. ``cancel`` is checked
before every piece and interrupts the wait between pieces, so a cancelled stream ends
at once, like a local model checking between tokens.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Callable, Iterator, Optional

from robix_planner.backends.base import Backend, BackendError, GenerationStats, ModelConfig, Prompt
from robix_planner.config import ConfigError

log = logging.getLogger(__name__)

#: A rule-based planner: the prompt in, the raw model output (in the Robix tag format) out.
RespondFn = Callable[[Prompt], str]

_TAG = re.compile(r"(<\|[^|<>\s]{1,64}\|>)")
_WORD = re.compile(r"\s*\S+|\s+")


def split_chunks(text: str) -> list[str]:
    """Split ``text`` into token-ish pieces whose concatenation is ``text`` exactly.

    Each ``<|tag|>`` is a piece of its own; other text is cut before each run of
    whitespace (a word carries the whitespace in front of it, like BPE tokens).
    """
    pieces: list[str] = []
    for part in _TAG.split(text):
        if not part:
            continue
        if _TAG.fullmatch(part):
            pieces.append(part)
        else:
            pieces.extend(_WORD.findall(part))
    return pieces


def prompt_size(prompt: Prompt) -> int:
    """A rough token count of a prompt: its text pieces plus one per image (for stats only)."""
    return sum(len(split_chunks(m.text)) + len(m.images) for m in prompt)


class ScriptedBackend(Backend):
    """Streams ``config.outputs`` one per call (the last repeats), or ``respond(prompt)``.

    Every call to :meth:`generate` takes the next output, a cancelled one included, as a
    model asked again would give a new answer.

    :attr:`prompts` keeps the most recent prompts received (newest last), so a test can
    check what the planner asked.
    """

    #: How many recent prompts :attr:`prompts` keeps.
    KEEP_PROMPTS = 64

    def __init__(self, config: ModelConfig, respond: Optional[RespondFn] = None):
        super().__init__(config)
        if respond is None and not config.outputs:
            raise ConfigError(
                "model.backend='scripted' needs model.outputs (a list of raw model outputs to replay, "
                "one per step) or, in code, ScriptedBackend(config, respond=fn)"
            )
        if respond is not None and not callable(respond):
            raise TypeError(f"respond must be a callable prompt -> str, got {type(respond).__name__}")
        if config.chunk_delay_s < 0:
            raise ConfigError(f"model.chunk_delay_s={config.chunk_delay_s} must be >= 0")
        self._respond = respond
        self._lock = threading.Lock()
        self._calls = 0
        self.prompts: collections.deque[Prompt] = collections.deque(maxlen=self.KEEP_PROMPTS)

    @property
    def calls(self) -> int:
        """How many times :meth:`generate` has started."""
        return self._calls

    def _answer(self, prompt: Prompt) -> tuple[str, int]:
        with self._lock:
            index = self._calls
            self._calls += 1
            self.prompts.append(prompt)
        if self._respond is None:
            outputs = self.config.outputs
            return outputs[min(index, len(outputs) - 1)], index
        try:
            text = self._respond(prompt)
        except BackendError:
            raise  # the function already said what went wrong
        except Exception as exc:
            raise BackendError(f"the scripted respond function failed: {exc!r}") from exc
        if not isinstance(text, str):
            raise BackendError(f"the scripted respond function returned {type(text).__name__}, not str")
        return text, index

    def generate(self, prompt: Prompt, *, cancel: threading.Event) -> Iterator[str]:
        stats = self.last_stats = GenerationStats(prompt_tokens=prompt_size(prompt))
        t0 = time.perf_counter()
        text, index = self._answer(prompt)
        t1 = time.perf_counter()
        stats.prefill_ms = (t1 - t0) * 1e3
        stats.extra["call"] = index
        delay = self.config.chunk_delay_s
        try:
            for i, piece in enumerate(split_chunks(text)):
                if i and delay > 0:
                    cancel.wait(delay)
                if cancel.is_set():
                    stats.cancelled = True
                    log.debug("scripted generation %d cancelled after %d pieces", index, stats.new_tokens)
                    return
                stats.new_tokens += 1
                yield piece
        finally:
            stats.decode_ms = (time.perf_counter() - t1) * 1e3
