"""Sampling parameters from Python callers are checked like the CLI's flags, and the cuts keep
the tokens they should."""

import math

import pytest
import torch

from localseek.errors import LocalseekError
from localseek.sampling import Sampler, SamplingParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ],
)
def test_bad_parameters_are_one_sentence(kwargs, message) -> None:
    with pytest.raises(LocalseekError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message + "."


def test_cuts_keep_only_the_tokens_they_should() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    greedy = Sampler(SamplingParams())
    assert greedy(logits) == 1
    top2 = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(200)} == {1, 2}
    # softmax 0.36, 0.32, 0.29, ...: 0.5 takes the first two
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {nucleus(logits) for _ in range(200)} == {1, 2}
    a = Sampler(SamplingParams(temperature=1.0, seed=3))
    b = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
