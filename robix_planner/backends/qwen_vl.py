"""Position ids for a prompt that is prefilled piece by piece (prefix reuse, chunked prefill).

A decoder normally numbers its tokens 0, 1, 2, ... and a continuation after ``n`` cached tokens
starts at ``n``: :class:`LinearPositions`. Qwen2-VL and Qwen2.5-VL use multimodal RoPE instead:
every token has three positions (time, height, width); a text token has the same number in all
three; an image's ``h x w`` grid of merged patches shares one start number ``s`` and spreads over
``s .. s+h-1`` (rows) and ``s .. s+w-1`` (columns); the token after the image continues at
``s + max(h, w)``. Positions therefore run *behind* the token count once an image is in the
prompt, and the model's own bookkeeping (``rope_deltas``, kept on the module between calls)
assumes one whole prompt per ``generate`` call.

:class:`MRopePositions` makes any piece computable on its own: a piece's positions are the
model's ``get_rope_index`` on the piece alone (which numbers from 0) plus the next free position
after the cached prefix, because every position in the scheme is "start + offset within the
piece". The backend keeps, for every cached token, the largest of its positions; the next piece
starts at that + 1. This is what lets a cached prefix be cropped anywhere and continued with a
suffix that holds new images, and it gives the same numbers as one full pass (a test checks
that greedy output with reuse equals a full recompute and equals ``model.generate``).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import inspect


class LinearPositions:
    """Plain 1-D positions (most decoders): the piece at cache length ``n`` starts at ``n``."""

    #: Pass the computed ids to the model (False: let the model number from its cache length).
    explicit = False

    def piece(self, input_ids, start: int, *, mm_token_type_ids=None, image_grid_thw=None):
        """Return ``(position_ids or None, per-token max position list)`` for one piece."""
        n = int(input_ids.shape[-1])
        return None, list(range(start, start + n))

    def decode(self, start: int, device):
        return None


class MRopePositions:
    """Qwen2-VL / Qwen2.5-VL 3-D positions for pieces of a prompt (see the module docstring)."""

    explicit = True

    def __init__(self, inner_model, image_token_id: int | None):
        self._inner = inner_model
        self._image_token_id = image_token_id
        self._params = set(inspect.signature(inner_model.get_rope_index).parameters)

    def piece(self, input_ids, start: int, *, mm_token_type_ids=None, image_grid_thw=None):
        """Positions ``(3, 1, n)`` for ``input_ids`` (1, n) that continue at ``start``.

        ``image_grid_thw`` lists the grids of exactly the images whose tokens are in this piece.
        """
        import torch

        n = int(input_ids.shape[-1])
        if image_grid_thw is None or len(image_grid_thw) == 0:
            pos = torch.arange(start, start + n, device=input_ids.device).view(1, 1, n).expand(3, 1, n)
            return pos, list(range(start, start + n))
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self._image_token_id).to(torch.int)
        kwargs = {"image_grid_thw": image_grid_thw, "attention_mask": None}
        if "mm_token_type_ids" in self._params:
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        if "video_grid_thw" in self._params:
            kwargs["video_grid_thw"] = None
        pos, _ = self._inner.get_rope_index(input_ids, **kwargs)
        pos = pos + start
        return pos, pos.amax(dim=0)[0].tolist()

    def decode(self, start: int, device):
        """Positions for one generated (text) token at position ``start``."""
        import torch

        return torch.full((3, 1, 1), start, dtype=torch.long, device=device)


def positions_for(model) -> LinearPositions | MRopePositions:
    """Pick the position scheme for a loaded model (a peft wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if inner is not None and callable(getattr(inner, "get_rope_index", None)):
        image_token_id = getattr(base.config, "image_token_id", None)
        return MRopePositions(inner, image_token_id)
    return LinearPositions()
