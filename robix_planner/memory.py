"""The planner's memory: the whole text history, and only the latest frames as images.

Every step (what the model was told, what it answered) is kept as text for the whole
session: utterances, thoughts, commands and how they ended, replies. Images are costly, so
only the latest ``max_images`` steps that have one show it; older steps keep their text with
:data:`robix_planner.format.IMAGE_DROPPED` where the image was. The text is never dropped:
when the prompt is over ``token_budget``, older images go first (down to the current view);
if the text alone is over the budget, a warning is logged and the text is kept.

**When images are dropped, and why in batches.** Dropping an image changes the prompt at
that step, so a backend's cached prefix (see the ``hf`` backend) is only valid up to there.
Dropping one image per step (a sliding window) would break the cache at the oldest image on
*every* step. Instead the *image horizon* (the first step whose images are shown) moves
only when more than ``max_images`` steps would show an image, and then by
``image_drop_batch`` image steps at once, so the prompt is append-only for
``image_drop_batch - 1`` steps out of ``image_drop_batch``, and each break only costs
re-reading the last ``max_images`` steps (the text before the horizon stays cached). Between
``max_images - image_drop_batch + 1`` and ``max_images`` images are shown. The horizon never
moves back: an image once dropped is never shown again. ``image_drop_batch: 1`` gives the
plain sliding window.
"""

from __future__ import annotations

import logging
from typing import Optional

from robix_planner import format as fmt
from robix_planner.backends.base import Prompt
from robix_planner.config import Config, ConfigError
from robix_planner.messages import Capabilities

log = logging.getLogger(__name__)


class MemoryConfig(Config):
    """The ``memory`` section of the planner config."""

    #: At most this many steps show their images (the newest ones); >= 1.
    max_images: int = 4
    #: Images are dropped this many steps at a time (keeps the prompt prefix stable; 1..max_images).
    image_drop_batch: int = 2
    #: Estimated prompt tokens allowed; over it older images are dropped (never text). 0 = no limit.
    token_budget: int = 32768
    #: Estimated tokens per image (for the budget only; the backend's processor decides the real count).
    image_tokens: int = 256
    #: Characters per token of text (for the budget estimate).
    chars_per_token: float = 4.0


def estimate_tokens(prompt: Prompt, *, image_tokens: int = 256, chars_per_token: float = 4.0) -> int:
    """A rough token count: characters / ``chars_per_token`` plus ``image_tokens`` per image."""
    chars = sum(len(m.text) for m in prompt)
    images = sum(len(m.images) for m in prompt)
    return int(chars / chars_per_token) + images * image_tokens


class Memory:
    """The history of one session, and the prompt for the next step.

        memory = Memory(MemoryConfig(max_images=4))
        prompt = memory.prompt(caps, current_step_input)
        memory.append(current_step_input, model_output)   # once the step is done
        memory.reset()                                    # on SessionStart
    """

    def __init__(self, config: Optional[MemoryConfig] = None):
        self.config = config or MemoryConfig()
        c = self.config
        if c.max_images < 1:
            raise ConfigError(f"memory.max_images={c.max_images} must be >= 1 (the current view)")
        if not 1 <= c.image_drop_batch <= c.max_images:
            raise ConfigError(f"memory.image_drop_batch={c.image_drop_batch} must be between 1 and "
                              f"memory.max_images={c.max_images}")
        if c.token_budget < 0 or c.image_tokens < 0 or c.chars_per_token <= 0:
            raise ConfigError("memory.token_budget and memory.image_tokens must be >= 0, chars_per_token > 0")
        self.steps: list[fmt.Step] = []
        #: Steps with an index below this show no images (it only grows; see the module docstring).
        self.image_horizon = 0
        self._warned_at = -1

    def __len__(self) -> int:
        return len(self.steps)

    def reset(self) -> None:
        """Forget the session (on ``SessionStart``)."""
        self.steps.clear()
        self.image_horizon = 0
        self._warned_at = -1

    def append(self, step_input: fmt.StepInput, output: fmt.ModelOutput) -> fmt.Step:
        """Record a finished step: exactly what the model was told and what it answered."""
        fmt.serialize(output)  # refuse what could not be written back into a prompt
        step = fmt.Step(step_input, output)
        self.steps.append(step)
        return step

    def _image_steps(self, current: fmt.StepInput) -> list[int]:
        """Indices (>= the horizon) of the steps with images, the current one included."""
        idx = [i for i in range(self.image_horizon, len(self.steps)) if self.steps[i].input.images]
        if current.images:
            idx.append(len(self.steps))
        return idx

    def _drop(self, idx: list[int], n: int) -> list[int]:
        """Move the horizon past the ``n`` oldest image steps of ``idx`` (always keeping the newest)."""
        n = min(n, len(idx) - 1)
        if n <= 0:
            return idx
        self.image_horizon = idx[n]
        return idx[n:]

    def prompt(self, caps: Capabilities, current: fmt.StepInput) -> Prompt:
        """The prompt for ``current`` after the history, within the image and token limits."""
        c = self.config
        idx = self._image_steps(current)
        if len(idx) > c.max_images:
            idx = self._drop(idx, max(c.image_drop_batch, len(idx) - c.max_images))
        prompt = fmt.build_prompt(caps, self.steps, current, images_from=self.image_horizon)
        if c.token_budget <= 0:
            return prompt
        while self._tokens(prompt) > c.token_budget and len(idx) > 1:
            idx = self._drop(idx, c.image_drop_batch)
            prompt = fmt.build_prompt(caps, self.steps, current, images_from=self.image_horizon)
        tokens = self._tokens(prompt)
        if tokens > c.token_budget and self._warned_at != len(self.steps):
            self._warned_at = len(self.steps)
            log.warning("the prompt needs about %d tokens, over memory.token_budget=%d, with the text of %d "
                        "steps and %d image(s) left; the text is kept whole (raise the budget or start a new "
                        "session)", tokens, c.token_budget, len(self.steps) + 1, len(idx))
        return prompt

    def _tokens(self, prompt: Prompt) -> int:
        return estimate_tokens(prompt, image_tokens=self.config.image_tokens,
                               chars_per_token=self.config.chars_per_token)
