"""Tokenization and chat templates for the orchestrator and the local path (not agents).

The chat template is the model's own Jinja template, rendered in a sandbox as transformers
does; `--raw` skips it. A model speaking OpenAI's harmony format (gpt-oss: its vocabulary
has the `<|channel|>`/`<|message|>` markers) answers in channels, reasoning first; the
client sees only the final channel (`harmony_answer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest


class ChatTokenizer:
    def __init__(self, manifest: Manifest) -> None:
        from tokenizers import Tokenizer

        d = manifest.directory
        tok_file = d / manifest.tokenizer.get("file", "tokenizer.json")
        cfg_file = d / manifest.tokenizer.get("config", "tokenizer_config.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ExportError(f"{tok_file}: cannot load tokenizer ({exc})") from exc
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token, self.eos_token = cfg.get("bos_token"), cfg.get("eos_token")
        self.eos_token_id: int | None = manifest.config.get("eos_token_id")
        self.context_length = int(manifest.config.get("max_position", 2048))
        self._template: Any = None
        self.harmony = all(self.tokenizer.token_to_id(t) is not None for t in HARMONY_MARKERS)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            raise ExportError("this model has no chat template; use --raw")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        return str(
            self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        )

    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]:
        """Token ids of `prompt`: rendered by the chat template (which writes any BOS itself)
        or, `raw`, as is with the tokenizer's own BOS/EOS rule (as transformers does)."""
        if raw:
            return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)
        text = self.render_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole conversation through the chat template, ready for the next answer."""
        return list(self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """The answer's text: for a harmony model, what its final channel says so far."""
        if self.harmony:
            return harmony_answer(str(self.tokenizer.decode(ids, skip_special_tokens=False)))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def encode_raw(self, text: str) -> list[int]:
        """Ids of text as is (no template, no added special tokens), as the orchestrator
        encodes a ``raw`` prompt."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")
_FINAL = "<|channel|>final<|message|>"
_MESSAGE_ENDS = ("<|return|>", "<|end|>", "<|call|>")


def harmony_answer(text: str) -> str:
    """The final channel's message in generated harmony text (special tokens kept):
    `<|channel|>analysis<|message|>..<|end|><|start|>assistant<|channel|>final<|message|>
    ANSWER<|return|>` -> ANSWER. Empty until the final channel starts (the reasoning is
    not the answer); a growing prefix while it streams, so deltas stay valid."""
    at = text.rfind(_FINAL)
    if at < 0:
        return ""
    body = text[at + len(_FINAL) :]
    ends = [i for i in (body.find(m) for m in _MESSAGE_ENDS) if i >= 0]
    return body[: min(ends)] if ends else body


def encode_chat(tok: ChatTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A whole conversation (``{role, content}`` turns, system/user/assistant) through the
    model's chat template, ready for the assistant's next turn: the prompt of the gateway's
    chat completions and of `e2llm chat`. For a single user message it equals
    ``tok.encode_prompt(content)``, what `e2llm generate` sends."""
    return tok.encode_raw(tok.render_chat(messages))


def _raise_exception(message: str) -> None:
    """What transformers gives templates to refuse a conversation (e.g. roles that do not
    alternate); the gateway answers it with a 400 naming the template's message."""
    raise ValueError(message)


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def _environment() -> Any:
    """The sandboxed Jinja environment transformers renders chat templates in: loop controls,
    `raise_exception` (a ValueError), `strftime_now` and a `tojson` that keeps non-ASCII text."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
        sort_keys: bool = False,
    ) -> str:  # fmt: skip
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back split UTF-8 chars."""

    def __init__(self, tok: Detokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    return ChatTokenizer(Manifest.load(model_dir))
