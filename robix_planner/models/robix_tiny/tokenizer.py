"""robix-tiny's tokenizer: a small byte-level BPE trained on our own corpus, and its chat template.

:func:`build_tokenizer` trains a BPE (the ``tokenizers`` library) on the texts it is given and
wraps it as a ``PreTrainedTokenizerFast`` that saves and loads with ``AutoTokenizer``. Byte-level
means any text encodes (no unknown token); a small vocabulary (1-4k) trained on the planner's own
prompts makes them short in tokens, because the system prompt, the skills, object names and the
status lines are whole tokens.

Tokens that never come from BPE merges (ids in this order, before the learned vocabulary):

- :data:`PAD` ``<|pad|>`` padding, never a target;
- :data:`EOS` ``<|end|>`` ends an assistant turn: the stop token of generation, trained inside the
  assistant mask so the model learns to stop;
- :data:`SYSTEM`, :data:`USER`, :data:`ASSISTANT` start a turn (``<|system|>``, ``<|user|>``,
  ``<|assistant|>``);
- :data:`IMAGE` ``<|image|>`` an image placeholder, expanded by the processor to one token per
  visual token.

These are special tokens (``decode(..., skip_special_tokens=True)`` drops them). The Robix tags of
:data:`robix_planner.format.TAGS` (``<|think_start|>`` ...) are whole tokens too, at the end of the
vocabulary, but *not* special: they are the model's output format, so they survive
``skip_special_tokens=True`` (trl decodes completions that way before the rewards parse them).

The chat template (:data:`CHAT_TEMPLATE`) writes a turn as its role token and its content, an
image as :data:`IMAGE`, and closes only assistant turns, with :data:`EOS`, inside
``{% generation %}`` markers (``return_assistant_tokens_mask`` / trl's ``assistant_only_loss``)::

    <|system|>You are Robix...<|user|><|system_info_start|>...head: <|image|><|system_info_end|>
    <|assistant|><|think_start|>...<|think_end|><|end|><|user|>...<|assistant|>

Every turn boundary is a special token, so a conversation's tokens are a prefix of the tokens of
any longer conversation that starts with it (the hf backend's prefix reuse relies on it).
"""

from __future__ import annotations

from typing import Iterable

from robix_planner.format import TAGS

PAD = "<|pad|>"
EOS = "<|end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
IMAGE = "<|image|>"
#: Special tokens, in id order (0..5).
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, SYSTEM, USER, ASSISTANT, IMAGE)

#: Role -> turn token. Unknown roles are a template error.
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('robix-tiny knows the roles system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|end|>{% endgeneration %}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|image|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

#: Smallest vocabulary that leaves room for the byte alphabet (256) and the fixed tokens.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(TAGS) + 16


def _strip_fixed_tokens(text: str) -> str:
    # The fixed tokens are never BPE pieces: cut them out of the training text so no merge learns them.
    for tok in SPECIAL_TOKENS + tuple(TAGS):
        text = text.replace(tok, "\n")
    return text


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2):
    """Train a byte-level BPE of ``vocab_size`` tokens in all on ``texts``; return a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts everything: the special tokens, the learned pieces (including the 256
    bytes) and the Robix tags. Deterministic for the same texts in the same order. The result has
    ``eos_token`` :data:`EOS`, ``pad_token`` :data:`PAD`, ``image_token`` :data:`IMAGE` and the chat
    template :data:`CHAT_TEMPLATE`; ``save_pretrained`` writes it for ``AutoTokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least {MIN_VOCAB} (256 bytes + fixed tokens)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAGS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((_strip_fixed_tokens(t) for t in texts), trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        model_max_length=65536,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    for t in SPECIAL_TOKENS + tuple(TAGS):  # fail here, not in training, if a fixed token is not one token
        if len(tok.encode(t, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{t!r} did not become a single token")
    return tok
