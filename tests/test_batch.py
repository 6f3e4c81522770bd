"""The input checks of ``areal_a3po.batch``: counts by hand, and every error with its message."""

import math

import pytest
import torch

from areal_a3po.batch import BatchCounts, check_theta_finite, check_versions, count_batch, require_versions, validate_batch

# Trainer version k = 4. Label-aligned row: a prompt position, then v = 3, 2, 0, 5, and a
# trained position carrying a prompt's version -1; position 2 has a NaN behaviour logprob.
K = 4
VERSIONS = torch.tensor([[-1, 3, 2, 0, 5, -1]], dtype=torch.int32)
MASK = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.int32)
BEHAVE = torch.tensor([[math.nan, -1.0, math.nan, -2.0, -0.5, -1.5]])


def test_counts_by_hand():
    # tokens: 5 (loss_mask = 1); NaN behaviour on position 2 only (position 0 is masked) -> 1;
    # v < 0 on position 5 -> 1; v = 5 > k = 4 on position 4 -> 1;
    # staleness k − v over v ≥ 0: 4−3 = 1, 4−2 = 2, 4−0 = 4, 4−5 = −1 -> max 4.
    assert count_batch(VERSIONS, MASK, BEHAVE, K) == BatchCounts(
        tokens=5, nonfinite_behave=1, negative_versions=1, newer_versions=1, max_staleness=4
    )


def test_a_clean_batch_returns_its_counts():
    versions = torch.tensor([[-1, 4, 2, 1]])
    counts = validate_batch(dict(versions=versions, loss_mask=torch.tensor([[0, 1, 1, 1]]), logprobs=torch.tensor([[math.nan, -1.0, -2.0, -3.0]])), K)
    assert counts == BatchCounts(tokens=3, nonfinite_behave=0, negative_versions=0, newer_versions=0, max_staleness=3)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(loss_mask=torch.zeros(1, 6, dtype=torch.int32)), r"every token of this batch is masked \('loss_mask' has no 1 on any response token\)"),
        ({}, r"the behaviour logprobs \('logprobs' from the inference engine\) are NaN/Inf on 1 generated token\(s\) with loss_mask=1"),
        (dict(logprobs=torch.zeros(1, 6)), r"A-3PO: 1 generated token\(s\) \(loss_mask=1\) have a negative 'versions' entry"),
        (dict(logprobs=torch.zeros(1, 6), versions=VERSIONS.clamp(min=0)), r"A-3PO: 1 generated token\(s\) have 'versions' newer than the trainer's version 4 \(v > k\)"),
    ],
    ids=["all-masked", "nonfinite", "negative", "newer"],
)
def test_each_problem_is_named_in_this_order(edit, message):
    data = dict(versions=VERSIONS, loss_mask=MASK, logprobs=BEHAVE)
    data.update(edit)
    with pytest.raises(ValueError, match=message):
        validate_batch(data, K)


def test_missing_versions_is_named_with_where():
    with pytest.raises(KeyError, match=r"needs the per-token 'versions' tensor in the batch \(ppo_update\)"):
        require_versions({"logprobs": BEHAVE}, "ppo_update")


@pytest.mark.parametrize(
    "versions, error, message",
    [
        (VERSIONS[:, :-1], ValueError, r"'versions' must have the shape of 'logprobs' \(1, 6\) \(one weight version per token\), got \(1, 5\) in the batch\."),
        (VERSIONS.float(), TypeError, r"'versions' must be an integer tensor .* got dtype torch\.float32 in the batch"),
        (VERSIONS.bool(), TypeError, r"got dtype torch\.bool in the batch"),
    ],
    ids=["shape", "float", "bool"],
)
def test_bad_versions_are_named(versions, error, message):
    with pytest.raises(error, match=message):
        check_versions({"versions": versions, "logprobs": BEHAVE}, "batch")
    assert check_versions({"versions": VERSIONS.long(), "logprobs": BEHAVE}, "batch").dtype == torch.int64


def test_non_finite_theta_counts_generated_tokens_only():
    theta = torch.tensor([math.nan, -1.0, -math.inf, math.nan])
    tokens = torch.tensor([False, True, True, True])
    with pytest.raises(FloatingPointError, match=r"NaN/Inf on 2 generated token\(s\) in minibatch 3"):
        check_theta_finite(theta, tokens, 3)
    check_theta_finite(theta, torch.tensor([False, True, False, False]), 0)  # NaN only off the tokens
