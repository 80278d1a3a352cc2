"""Generation parameters and their one validation, shared by the local path and the cluster.

A request is judged the same way wherever it runs: the local CLI checks it before loading
the model, the orchestrator before queueing it (its ``ParamError`` becomes a
``bad_request`` answer). Pure: no model files, tokenizer, clock or I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from e2llm_edge.device.sampling import Sampling
from e2llm_edge.errors import ParamError


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one answer; built only from valid values (``ParamError`` otherwise)."""

    max_new_tokens: int = 64
    """Most tokens to generate (the answer may stop earlier at end of sequence)."""
    temperature: float = 0.0
    """0 is greedy; otherwise in (0, 10]."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int = 0
    """Seed of a sampled request: the same seed draws the same tokens on any device."""
    raw: bool = False
    """True: the prompt is used as is, without the chat template."""

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParamError("max_new_tokens", f"max_new_tokens must be at least 1, got {n!r}")
        if not isinstance(self.raw, bool):
            raise ParamError("raw", f"raw must be true or false, got {self.raw!r}")
        self.sampling()  # the sampler's own rules, so the two can never disagree

    def sampling(self) -> Sampling:
        """The sampler settings (SamplingError, a ParamError, if they are invalid)."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass(frozen=True)
class ModelLimits:
    """What a model can take: its context window and its vocabulary."""

    context_length: int
    """Prompt plus generated tokens may not exceed this."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelLimits:
        """From a manifest's ``config`` (``max_position``, ``vocab_size``)."""
        return cls(int(config["max_position"]), int(config["vocab_size"]))


def check_prompt(prompt: str) -> None:
    """Refuse a prompt with nothing in it (before any tokenizer runs)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParamError("prompt", "empty prompt: nothing to generate from")


def validate(
    params: GenerationParams,
    prompt_ids: Sequence[int],
    limits: ModelLimits,
    *,
    prompt: str | None = None,
) -> None:
    """Everything a request must satisfy to run on a model; ``ParamError`` names what not.

    ``params`` is valid by construction; here it meets the prompt (its text when given,
    its token ids always) and the model's context window and vocabulary.
    """
    if prompt is not None:
        check_prompt(prompt)
    if not prompt_ids:
        raise ParamError("prompt", "empty prompt: nothing to generate from")
    bad = next((t for t in prompt_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise ParamError(
            "prompt_ids",
            f"prompt token id {bad} is outside the vocabulary [0, {limits.vocab_size})",
        )
    if len(prompt_ids) + params.max_new_tokens > limits.context_length:
        raise ParamError(
            "max_new_tokens",
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} "
            f"exceeds the context of {limits.context_length} tokens",
        )
