"""The harness's verifiable tasks: reverse a string of digits, scored position by position.

One score, ``reversal_score``: the mean over the answer's positions i of ``1 − |g_i − a_i|/9`` when
the i-th generated token g_i is a digit, 0 when it is not (or missing): 1 for the exact reversal,
partial credit for digits near the right one, so that a random model gets a signal it can climb
from the first step. It is served in two forms:

- ``reward_fn``: AReaL's reward-function signature on text (real runs: ``benchmarks.harness.train``),
  with ``reversal_dataset`` (``"3 1 4 ="`` → ``"4 1 3"``, AReaL's GSM8K ``messages``/``answer`` format);
- ``token_reward``: on token ids of the ``toy`` model (``benchmarks.learning``).

``digit_share`` (the share of response tokens that are digits) is ``benchmarks.accuracy``'s reward:
easy to learn, so that the policy drifts in one direction from version to version.
"""

from __future__ import annotations

import random
import torch

from benchmarks.harness.models import BOS_ID, VOCAB

__all__ = ["digit_share", "reversal_dataset", "reversal_prompts", "reversal_score", "reward_fn", "token_reward"]


def reversal_score(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean over the last dimension of ``1 − |g − a|/9``, 0 where ``got`` is −1 (no digit there).

    ``got``, ``want``: integer digits 0..9, same shape ``[..., N]``; returns ``dtype`` ``[...]``.
    """
    return torch.where(got >= 0, 1.0 - (got - want).abs().to(dtype) / 9.0, 0.0).mean(-1)


def reward_fn(prompt, completions, prompt_ids, completion_ids, answer, **kwargs) -> float:
    """``reversal_score`` of the completion's whitespace-separated words against ``answer``'s
    (extra words are ignored, missing ones score 0)."""
    want = [int(a) for a in str(answer).split()]
    words = str(completions).split()[: len(want)]
    got = [int(g) if g.isdigit() and len(g) == 1 else -1 for g in words] + [-1] * (len(want) - len(words))
    if not want:
        return 0.0
    return float(reversal_score(torch.tensor(got), torch.tensor(want), torch.float64))


def reversal_dataset(n: int, *, seed: int = 0, digits: int = 4):
    """``n`` digit-reversal prompts as a ``datasets.Dataset`` of ``messages`` and ``answer``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ds = [str(rng.randrange(10)) for _ in range(digits)]
        rows.append({"messages": [{"role": "user", "content": " ".join(ds) + " ="}], "answer": " ".join(reversed(ds))})
    return Dataset.from_list(rows)


def _digit_ids() -> torch.Tensor:
    return torch.tensor([VOCAB.index(str(i)) for i in range(10)])


def reversal_prompts(n: int, n_digits: int, generator: torch.Generator) -> torch.Tensor:
    """``<bos> d1 .. dN =`` as ``toy`` token ids, [n, n_digits + 2]."""
    digits = _digit_ids()[torch.randint(0, 10, (n, n_digits), generator=generator)]
    return torch.cat([torch.full((n, 1), BOS_ID), digits, torch.full((n, 1), VOCAB.index("="))], dim=1)


def token_reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """``reversal_score`` per row of ``toy`` token ids: target = the prompt's digits (after ``<bos>``) reversed."""
    digits = _digit_ids()
    value = lambda ids: torch.where(torch.isin(ids, digits), (ids.unsqueeze(-1) == digits).long().argmax(-1), -1)  # noqa: E731
    return reversal_score(value(responses), value(prompts[:, 1 : 1 + responses.shape[1]].flip(-1)))


def digit_share(responses: torch.Tensor) -> torch.Tensor:
    """Share of each row's ``toy`` tokens that are digits."""
    return torch.isin(responses, _digit_ids()).float().mean(-1)
