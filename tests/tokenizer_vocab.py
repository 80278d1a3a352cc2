"""Vocabularies for tokenizer tests: trained here with `tokenizers` under a given
pre-tokenizer (so merges respect its boundaries and a wrong split changes the ids), written as
vocabulary-only GGUFs the way llama.cpp's converter writes them."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Hello world! It's a test, isn't it? We'll see, they've said; I'd say you're right.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "x   =   1\t\t# tabs\n\n\n   trailing   \n  \n",
    "Emoji: 😀🎉👍🏽 and a family 👨\u200d👩\u200d👧 here",
    "中文测试：你好，世界。日本語のテキスト。한국어 텍스트입니다",
    "Accents: café, naïve, Ångström, façade, jalapeño, Zürich, ÉCOLE, São Paulo",
    "Numbers 1234567890 3.14159 1,000,000 and the 42nd time in 2024",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "   leading spaces and    runs      of whitespace",
    "MiXeD CaSe WORDS ALLCAPS camelCaseWords snake_case_words HTTPServer",
    "URLs: https://example.com/path?q=1&r=2#frag and emails a.b@c.de",
    "don't DON'T You're YOU'RE I'M i'm we'VE",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN = CORPUS * 3 + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "import numpy as np\nfor i in range(10):\n    print(i * 2)\n",
]


def train_byte_level(pre: str, vocab_size: int = 700) -> tuple[list[str], list[str]]:
    """Tokens (by id) and merges of a byte-level BPE trained under `pre` (llama.cpp name)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from onnx_export.source import TokenizerData
    from onnx_export.tokenizer import build_tokenizer_json

    # our own definition of `pre` supplies the split; the test then checks llama.cpp agrees
    shape = Tokenizer.from_str(
        build_tokenizer_json(
            TokenizerData(
                None, None, None, tokens=["a", "aa"], token_types=[1, 1], merges=["a a"], pre=pre
            )
        )
    )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = shape.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TRAIN, trainer)
    import json

    model = json.loads(tk.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def train_sentencepiece(vocab_size: int = 500) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: <unk>, <s>, </s>, two chat control tokens, the 256
    byte pieces, characters and merged pieces with scores in merge order (as SentencePiece
    BPE models score them)."""
    import json

    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(TRAIN, vocab_size=vocab_size, show_progress=False, min_frequency=1)
    model = json.loads(sp.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merged = ["".join(m.split(" ")) for m in merges]
    chars = [t for t in model["vocab"] if t not in set(merged)]
    tokens = ["<unk>", "<s>", "</s>", *SPECIALS[1:]] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    for rank, piece in enumerate(dict.fromkeys(merged)):
        if piece not in seen:
            tokens.append(piece)
            scores.append(-float(rank))
            types.append(1)
            seen.add(piece)
    for i, piece in enumerate(chars):
        if piece not in seen:
            tokens.append(piece)
            scores.append(-float(len(merged) + i))
            types.append(1)
            seen.add(piece)
    return tokens, scores, types


def write_vocab_gguf(
    path: Path,
    model: str,
    tokens: list[str],
    types: list[int],
    *,
    merges: list[str] | None = None,
    scores: list[float] | None = None,
    pre: str | None = None,
    add_bos: bool | None = None,
    add_space_prefix: bool | None = None,
    bos: int = 1,
    eos: int = 2,
    arch: str = "llama",
) -> Path:
    """A GGUF holding only hyperparameters and the vocabulary (llama.cpp's vocab_only load)."""
    import gguf

    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(1)
    wr.add_context_length(256)
    wr.add_embedding_length(64)
    wr.add_feed_forward_length(96)
    wr.add_head_count(4)
    wr.add_head_count_kv(4)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_tokenizer_model(model)
    if pre is not None:
        wr.add_tokenizer_pre(pre)
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    if merges is not None:
        wr.add_token_merges(merges)
    if scores is not None:
        wr.add_token_scores(scores)
    wr.add_bos_token_id(bos)
    wr.add_eos_token_id(eos)
    if add_bos is not None:
        wr.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        wr.add_add_space_prefix(add_space_prefix)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path
