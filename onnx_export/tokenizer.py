"""Rebuild a model's tokenizer as a `tokenizers` tokenizer.json and keep its chat template.

A GGUF carries the vocabulary and names the tokenizer the way llama.cpp reads it:
`tokenizer.ggml.model` "gpt2" is byte-level BPE (vocabulary and merges) split first by the
regular expressions llama.cpp names with `tokenizer.ggml.pre`; "llama" is SentencePiece
(pieces and scores; merges follow from the scores) with byte fallback. The result tokenizes
as llama.cpp does on the same file: the regexes below are those of the models' own
tokenizer.json files (`tokenizers` speaks their `(?i:...)` syntax, which llama.cpp spells
out), control tokens are special, user-defined ones are matched whole, and a SentencePiece
text segment gets its prefix space after every special token, as llama.cpp's does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnx_export.errors import ExportError
from onnx_export.source import TokenizerData

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# llama.cpp pre-tokenizer name -> (regex splits applied in order, whole-word lookup first).
# "digits" splits every digit on its own (the starcoder family), then the GPT-2 regex.
_PRE: dict[str, tuple[tuple[str, ...], bool]] = {
    # llama.cpp's fallback for a BPE vocabulary that names no known pre-tokenizer
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), ((_GPT2,), False)),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        ((_LLAMA3,), True),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), ((_QWEN2,), False)),
    **dict.fromkeys(("gpt-4o", "llama4"), ((_GPT4O,), False)),
    "tekken": ((_TEKKEN,), True),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"),
        (("digits", _GPT2), False),
    ),
}
SUPPORTED_PRE = sorted(_PRE)


def check_tokenizer(tok: TokenizerData, where: Path | str) -> None:
    """Refuse a tokenizer this module cannot rebuild exactly, naming the file and value."""
    if tok.tokenizer_json is not None:
        return
    if tok.model == "gpt2" and (tok.pre or "default") not in _PRE:
        raise ExportError(
            f"{where}: tokenizer pre-tokenizer {tok.pre!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_PRE)})"
        )
    if tok.model == "llama" and len(tok.scores) != len(tok.tokens):
        raise ExportError(f"{where}: SentencePiece vocabulary without tokenizer.ggml.scores")
    if tok.model == "gpt2" and not tok.merges:
        raise ExportError(f"{where}: byte-level BPE vocabulary without tokenizer.ggml.merges")
    if tok.model == "gpt2":
        vocab = set(tok.tokens)
        for i, m in enumerate(tok.merges):
            a, _, b = m.partition(" ")
            if not (a in vocab and b in vocab and a + b in vocab):
                # `tokenizers` aborts the process on such a merge; say which one instead
                raise ExportError(
                    f"{where}: tokenizer.ggml.merges[{i}] = {m!r} joins tokens not in "
                    "the vocabulary"
                )


def _byte_level(tok: TokenizerData) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    splits, ignore_merges = _PRE[tok.pre or "default"]
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    merges = [(a, b) for a, b in (m.split(" ", 1) for m in tok.merges)]
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    )
    steps = [
        pre_tokenizers.Digits(individual_digits=True)
        if s == "digits"
        else pre_tokenizers.Split(Regex(s), behavior="isolated")
        for s in splits
    ]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's best-score-first pair merging: every way to
    cut a piece into two pieces of the vocabulary, ranked by the whole piece's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece(tok: TokenizerData) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    unk = next(
        (t for t, ty in zip(tok.tokens, tok.token_types, strict=False) if ty == UNKNOWN), None
    )
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(tok.tokens, tok.scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    norm: list[Any] = [normalizers.Replace(" ", "\u2581")]
    if tok.add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if tok.add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def build_tokenizer_json(tok: TokenizerData) -> str:
    """A tokenizer.json string for `tokenizers.Tokenizer.from_str`."""
    if tok.tokenizer_json is not None:
        return tok.tokenizer_json
    from tokenizers import AddedToken, processors

    check_tokenizer(tok, "tokenizer")
    tk = _byte_level(tok) if tok.model == "gpt2" else _sentencepiece(tok)
    kinds = list(zip(tok.tokens, tok.token_types, strict=False))
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in kinds
            if ty in (CONTROL, UNKNOWN)
        ]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in kinds if ty == USER_DEFINED]
    )
    bos, eos = tok.bos_token, tok.eos_token
    single = [
        *([bos] if tok.add_bos and bos else []),
        "$A",
        *([eos] if tok.add_eos and eos else []),
    ]
    if len(single) > 1:
        ids = {t: tok.tokens.index(t) for t in single if t != "$A"}
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), special_tokens=list(ids.items())
        )
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
        "add_bos_token": tok.add_bos,
    }
    tc.write_text(json.dumps(cfg, indent=1))
    return [tj, tc]


PROFILE_TEXT = """\
The workshop opens at eight, but the first deliveries arrive earlier: a crate of copper
wire, two boxes of screws and a note from the supplier saying the rest will come on Friday.
Maria checks the list against the invoice, signs it and carries the crate to the back room.
By nine the radio is on, the kettle has boiled twice and someone has already asked where
the good scissors went.

Q: How do I keep a sourdough starter alive while I am away for two weeks?
A: Feed it, let it rise for an hour, then put it in the fridge in a clean jar with a loose
lid. Before you bake again, take it out, discard half and feed it twice a day until it
doubles within six hours.

def moving_average(values, window):
    \"\"\"The mean of each run of `window` consecutive values.\"\"\"
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out

Meeting notes, 14 March: the bridge inspection is moved to April because of the weather;
the council will publish the new timetable next week. Budget: 12,400 euros for repairs,
3,100 for signs. Action items: Tom calls the contractor, Aisha drafts the letter to the
residents, everyone reads the safety report before Thursday.

Il pleut depuis ce matin et la rue est presque vide. Un chat traverse la place, s'arrete
devant la boulangerie, puis repart sans se presser.

When the train finally left the station, the old man by the window took out a notebook and
began to draw the hills as they passed: quick lines for the ridges, small crosses for the
churches, and a long curve for the river that followed the tracks all the way to the coast.
"""
"""A few kinds of text a model is asked about (prose, a question, code, notes, another
language), in the exporter's tokenizer as `Manifest.profile_ids`: device profiles feed
these to the layers, so a mixture of experts routes as on real inputs."""


def profile_ids(tokenizer_json: Path) -> list[int]:
    """`PROFILE_TEXT` in the ids of the tokenizer written at `tokenizer_json`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return list(tok.encode(PROFILE_TEXT, add_special_tokens=False).ids)
