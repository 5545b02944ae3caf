"""Tokenizer, chat template and incremental detokenization.

The server process owns the tokenizer: it tokenizes prompts before any engine
work (so length checks and bad input fail early) and turns the token ids that
the worker publishes back into text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tilert.engine.checkpoint import TokenizerSpec
from tilert.engine.errors import CheckpointError

CHAT_ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (raise_exception in the template)."""


class Tokenizer:
    def __init__(self, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if spec.tokenizer_json is not None:
            self._tk = HFTokenizer.from_str(spec.tokenizer_json)
        elif spec.build is not None:
            self._tk = spec.build()
        else:
            raise CheckpointError("the checkpoint has no tokenizer")
        self.bos_token = spec.bos_token
        self.eos_token = spec.eos_token
        self.add_bos = spec.add_bos
        self.bos_id = self._tk.token_to_id(spec.bos_token) if spec.bos_token else None
        self.chat_template = spec.chat_template
        self._template: Any = None
        self.special_ids = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self._tk.decode([token_id], skip_special_tokens=False)

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("the model has no chat template; send text or token ids")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ChatTemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        # The template writes BOS itself where the model wants one.
        return self.encode(self.render_chat(messages), add_bos=False)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens and emits only the text that is
    complete: a trailing U+FFFD means a multi-byte character is still cut, so
    that text waits for the next token.
    """

    tokenizer: Tokenizer
    _ids: list[int] | None = None
    _prefix: int = 0  # start of the decode window
    _read: int = 0  # tokens whose text was already emitted

    def __post_init__(self) -> None:
        self._ids = []

    def push(self, token_id: int) -> str:
        ids = self._ids
        assert ids is not None
        ids.append(token_id)
        before = self.tokenizer.decode(ids[self._prefix : self._read])
        after = self.tokenizer.decode(ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._prefix = self._read
            self._read = len(ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held at the end of the stream (a cut character, as U+FFFD)."""
        ids = self._ids
        assert ids is not None
        before = self.tokenizer.decode(ids[self._prefix : self._read])
        after = self.tokenizer.decode(ids[self._prefix :])
        self._prefix = self._read = len(ids)
        return after[len(before) :]
