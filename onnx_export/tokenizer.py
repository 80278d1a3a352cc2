"""Rebuild a model's tokenizer as a `tokenizers` tokenizer.json and keep its chat template.

GGUF carries byte-level BPE vocab and merges plus a pre-tokenizer name; the regexes named
here are llama.cpp's for those names, expressed with `tokenizers` pre-tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnx_export.errors import ExportError
from onnx_export.source import TokenizerData

CONTROL = 3  # llama.cpp token type of special/control tokens


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp splits every digit on its own before the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    raise ExportError(
        f"tokenizer pre-tokenizer {pre!r} is not supported "
        "(supported: smollm, starcoder, refact, gpt2)"
    )


def build_tokenizer_json(tok: TokenizerData) -> str:
    """A tokenizer.json string for `tokenizers.Tokenizer.from_str`."""
    if tok.tokenizer_json is not None:
        return tok.tokenizer_json
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tok.tokens)}
    merges: list[tuple[str, str]] = []
    for m in tok.merges:
        a, b = m.split(" ", 1)
        merges.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = _pre_tokenizer(tok.pre)
    tk.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tok.tokens, tok.token_types, strict=False) if ty == CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return str(tk.to_str())


def write_tokenizer(tok: TokenizerData, out_dir: Path) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json (chat template, bos/eos)."""
    tj = out_dir / "tokenizer.json"
    tj.write_text(build_tokenizer_json(tok))
    tc = out_dir / "tokenizer_config.json"
    cfg = {
        "chat_template": tok.chat_template,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
    }
    tc.write_text(json.dumps(cfg, indent=1))
    return [tj, tc]
