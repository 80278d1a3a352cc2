"""The one validation of a generation request, shared by the local path and the cluster."""

from __future__ import annotations

from typing import Any

import pytest

from e2llm_edge.device.sampling import SamplingError
from e2llm_edge.errors import ParamError
from e2llm_edge.params import GenerationParams, ModelLimits, check_prompt, validate

LIMITS = ModelLimits(context_length=100, vocab_size=50)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"max_new_tokens": -5}, "max_new_tokens", "max_new_tokens must be at least 1, got -5"),
        ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be at least 1, got 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens", "max_new_tokens must be at least 1, got 2.5"),
        ({"max_new_tokens": True}, "max_new_tokens", "max_new_tokens must be at least 1, got True"),
        ({"temperature": -1.0}, "temperature", "temperature must be in [0, 10], got -1.0"),
        ({"temperature": float("nan")}, "temperature", "temperature must be in [0, 10], got nan"),
        ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1], got 0.0"),
        ({"seed": -1}, "seed", "seed must be a non-negative integer, got -1"),
        ({"raw": "yes"}, "raw", "raw must be true or false, got 'yes'"),
    ],
)
def test_bad_parameters_are_refused_by_name(
    fields: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ParamError) as err:
        GenerationParams(**fields)
    assert err.value.field == field
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)  # callers that catch ValueError keep working


def test_sampling_errors_are_param_errors() -> None:
    """The sampler keeps its own check (devices sample); it is the same rule and type."""
    with pytest.raises(SamplingError) as err:
        GenerationParams(top_p=2.0)
    assert isinstance(err.value, ParamError) and err.value.field == "top_p"
    assert GenerationParams(temperature=0.7, top_p=0.9, seed=7).sampling().seed == 7


@pytest.mark.parametrize(
    ("ids", "max_new", "prompt", "field", "message"),
    [
        ([], 10, None, "prompt", "empty prompt: nothing to generate from"),
        ([1, 2], 10, "   ", "prompt", "empty prompt: nothing to generate from"),
        ([1, 50], 10, None, "prompt_ids", "prompt token id 50 is outside the vocabulary [0, 50)"),
        ([-1], 10, None, "prompt_ids", "prompt token id -1 is outside the vocabulary [0, 50)"),
        (
            [1] * 91,
            10,
            None,
            "max_new_tokens",
            "prompt of 91 tokens + max_new_tokens 10 exceeds the context of 100 tokens",
        ),
    ],
)
def test_request_against_the_model(
    ids: list[int], max_new: int, prompt: str | None, field: str, message: str
) -> None:
    with pytest.raises(ParamError) as err:
        validate(GenerationParams(max_new_tokens=max_new), ids, LIMITS, prompt=prompt)
    assert (err.value.field, str(err.value)) == (field, message)


def test_a_request_that_fits_exactly_passes() -> None:
    validate(GenerationParams(max_new_tokens=10), [49] * 90, LIMITS, prompt="hi")
    check_prompt("hi")


def test_limits_from_a_manifest_config() -> None:
    assert ModelLimits.from_config({"max_position": 8192, "vocab_size": 49152}) == ModelLimits(
        8192, 49152
    )
