"""Stale batches for the in-process harness, shaped the way AReaL's inference engine hands them over.

A *stale stream* yields, for trainer step ``step``, a ``Rollout``: token ids, the loss mask, each
token's weight ``versions`` (−1 on the prompt) and its behaviour logprob, log π_behave, as an
inference engine reports it (position t holds log π(token t | tokens < t), 0 on the prompt). How the
behaviour policy is obtained is what tells the implementations apart:

- ``noisy_rollout``: the actor's own logprobs plus Gaussian noise, tagged with given versions (a
  stand-in for older weights when only the shapes and the code path matter: tests, ``step_time``);
- ``ScoredStream``: random tokens scored by the weight snapshot of each token's version (the demo);
- ``SampledStream``: responses *sampled* by the snapshot of their version (``learning``, ``accuracy``).

``Rollout.trajectories()`` gives what AReaL's ``RLVRWorkflow`` returns per trajectory: int32
``input_ids``/``loss_mask``/``versions``, float32 ``logprobs`` and ``rewards``, a bool
``attention_mask``, each row cut to its own length (``lengths``), so AReaL pads them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from benchmarks.harness.actor import copy_flat
from benchmarks.harness.models import VOCAB

__all__ = ["Rollout", "Sampler", "StaleStream", "noisy_rollout", "random_tokens"]


@dataclass
class Rollout:
    """A batch as AReaL's inference engine hands it to the trainer (``trajectories()``)."""

    input_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1 on generated tokens
    versions: torch.Tensor  # [B, T] version per token, -1 on the prompt
    logprobs: torch.Tensor  # [B, T] log π_behave of token t at position t (0 on the prompt)
    rewards: torch.Tensor  # [B]
    lengths: list[int] | None = None  # each row's length (None: all T); the rest of a row is ignored

    def trajectories(self) -> list[dict[str, Any]]:
        """One dict per row, ``[1, length]`` each, with the dtypes of AReaL's ``RLVRWorkflow``."""
        B, T = self.input_ids.shape
        lengths = self.lengths or [T] * B
        return [
            dict(
                input_ids=self.input_ids[i : i + 1, :n].to(torch.int32),
                attention_mask=torch.ones(1, n, dtype=torch.bool),
                loss_mask=self.loss_mask[i : i + 1, :n].to(torch.int32),
                logprobs=self.logprobs[i : i + 1, :n].to(torch.float32),
                versions=self.versions[i : i + 1, :n].to(torch.int32),
                rewards=self.rewards[i : i + 1].to(torch.float32),
            )
            for i, n in enumerate(lengths)
        ]


class StaleStream(Protocol):
    """Anything that yields the batch consumed at a trainer step."""

    def batch(self, step: int) -> Rollout: ...


def random_tokens(n_seqs: int, seq_len: int, prompt_len: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``toy`` token ids (no special tokens) and the loss mask of the response part."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(VOCAB), (n_seqs, seq_len), generator=g)
    loss_mask = torch.zeros(n_seqs, seq_len, dtype=torch.int32)
    loss_mask[:, prompt_len:] = 1
    return ids, loss_mask


def token_logprobs(actor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(token t | tokens < t) at position t, as an inference engine reports it ([B, T], 0 at t=0).

    AReaL's ``compute_logp`` is label-aligned (position t holds token t+1); shift it right by one.
    """
    T = input_ids.shape[1]
    trajs = [dict(input_ids=x[None], attention_mask=torch.ones(1, T, dtype=torch.bool)) for x in input_ids]
    label_aligned = torch.cat(actor.compute_logp(trajs), dim=0).float()
    out = torch.zeros_like(label_aligned)
    out[:, 1:] = label_aligned[:, :-1]
    return out


def noisy_rollout(
    actor,
    ids: torch.Tensor,
    loss_mask: torch.Tensor,
    versions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    noise: float,
    generator: torch.Generator,
    lengths: list[int] | None = None,
) -> Rollout:
    """log π_behave = the actor's own token logprobs + ``noise``·N(0, 1), 0 off the loss mask."""
    logp = token_logprobs(actor, ids)
    behave = (logp + noise * torch.randn(ids.shape, generator=generator)) * loss_mask
    return Rollout(ids, loss_mask, versions, behave, rewards, lengths)


class Sampler:
    """The toy's inference engine: a plain ``transformers`` copy of the model that samples responses.

    ``load(flat)`` takes a weight vector from ``parameters(actor)`` (a snapshot of some version);
    ``sample`` draws responses at temperature 1 and returns each token's logprob under the loaded
    weights, as AReaL's inference engine reports them (position t holds log π(token t), 0 on the
    prompt).
    """

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()

    def load(self, flat: torch.Tensor) -> None:
        copy_flat(self.model, flat)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, new_tokens: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``new_tokens`` sampled tokens to each prompt row; returns (ids [B, P+N], logprobs [B, P+N])."""
        ids = prompts.clone()
        logps = torch.zeros(prompts.shape[0], prompts.shape[1] + new_tokens)
        for t in range(new_tokens):
            logits = self.model(input_ids=ids).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            token = torch.multinomial(logp.exp(), 1, generator=generator)
            logps[:, ids.shape[1]] = logp.gather(1, token).squeeze(1)
            ids = torch.cat([ids, token], dim=1)
        return ids, logps
