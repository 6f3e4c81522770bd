"""Stale batches for the in-process harness, shaped the way AReaL's inference engine hands them over.

A *stale stream* (``StaleStream``) gives, for trainer step ``step``, a ``Rollout``: token ids, the
loss mask, each token's weight ``versions`` (−1 on the prompt) and its behaviour logprob,
log π_behave, as an inference engine reports it (position t holds log π(token t | tokens < t), 0 on
the prompt). How the behaviour policy is obtained tells the implementations apart:

- ``NoisyStream``: random tokens, log π_behave = the actor's *current* logprobs plus Gaussian noise,
  each sequence tagged up to ``max_staleness`` versions back (when only shapes and the code path
  matter: ``step_time``'s shared actor); ``noisy_rollout`` is its one-batch form (tests);
- ``ScoredStream``: random tokens scored by the weight snapshot of each token's version, with a
  version switch mid-response in every other sequence (the demo, ``step_time``);
- ``SampledStream``: responses *sampled* by the snapshot of their version (``learning``, ``accuracy``).

Snapshots are weight vectors from ``benchmarks.harness.actor.parameters``, indexed by version; the
run that trains the policy appends one per step to the list the stream holds.

``Rollout.trajectories()`` gives what AReaL's ``RLVRWorkflow`` returns per trajectory: int32
``input_ids``/``loss_mask``/``versions``, float32 ``logprobs`` and ``rewards``, a bool
``attention_mask``, each row cut to its own length (``lengths``), so AReaL pads them itself; with
``group_size`` > 1, one dict per prompt group (``[group_size, L]``, padded by AReaL's
``concat_padded_tensors``), as AReaL's loop hands a prompt's samples to the trainer. AReaL 2.0
normalises group rewards over each dict (its batch size is the group size), 1.0.4 over
``reward_norm.group_size`` consecutive rows: both see the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from benchmarks.harness.actor import copy_flat, load_parameters
from benchmarks.harness.models import VOCAB

__all__ = [
    "NoisyStream",
    "Rollout",
    "SampledStream",
    "Sampler",
    "ScoredStream",
    "StaleStream",
    "noisy_rollout",
    "random_prompts",
    "random_tokens",
    "token_logprobs",
]


@dataclass
class Rollout:
    """A batch as AReaL's inference engine hands it to the trainer (``trajectories()``)."""

    input_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1 on generated tokens
    versions: torch.Tensor  # [B, T] version per token, -1 on the prompt
    logprobs: torch.Tensor  # [B, T] log π_behave of token t at position t (0 on the prompt)
    rewards: torch.Tensor  # [B]
    lengths: list[int] | None = None  # each row's length (None: all T); the rest of a row is ignored
    group_size: int = 1  # rows per prompt (consecutive): trajectories() gives one dict per group

    def trajectories(self) -> list[dict[str, Any]]:
        """One dict per row, ``[1, length]`` each, with the dtypes of AReaL's ``RLVRWorkflow``; with
        ``group_size`` > 1 one per prompt group, as AReaL's grouped rollout concatenates them."""
        rows = self._rows()
        if self.group_size == 1:
            return rows
        from areal.utils.data import concat_padded_tensors

        g = self.group_size
        return [concat_padded_tensors(rows[i : i + g]) for i in range(0, len(rows), g)]

    def _rows(self) -> list[dict[str, Any]]:
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

    def mean_staleness(self, step: int) -> float:
        """Mean of ``step − version`` over the generated tokens (float32, as the rewards)."""
        generated = self.loss_mask.bool()
        return (step - self.versions[generated]).float().mean().item()


class StaleStream(Protocol):
    """Anything that gives the batch consumed at a trainer step."""

    def batch(self, step: int) -> Rollout: ...


def random_tokens(n_seqs: int, seq_len: int, prompt_len: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``toy`` token ids (no special tokens) and the loss mask of the response part."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(VOCAB), (n_seqs, seq_len), generator=g)
    loss_mask = torch.zeros(n_seqs, seq_len, dtype=torch.int32)
    loss_mask[:, prompt_len:] = 1
    return ids, loss_mask


def random_prompts(n_seqs: int, prompt_len: int) -> Callable[[torch.Generator], torch.Tensor]:
    """Prompts of random ``toy`` token ids (no special tokens), drawn from the stream's generator."""
    return lambda generator: torch.randint(3, len(VOCAB), (n_seqs, prompt_len), generator=generator)


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


def _noisy_logprobs(actor, ids: torch.Tensor, loss_mask: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    return (token_logprobs(actor, ids) + noise * torch.randn(ids.shape, generator=generator)) * loss_mask


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
    behave = _noisy_logprobs(actor, ids, loss_mask, noise, generator)
    return Rollout(ids, loss_mask, versions, behave, rewards, lengths)


def _coin_rewards(n_seqs: int, generator: torch.Generator) -> torch.Tensor:
    # Random 0/1 rewards: the random-token streams have no task.
    return (torch.rand(n_seqs, generator=generator) > 0.5).float()


@dataclass
class NoisyStream:
    """Random tokens; each sequence's response tagged ``step − d``, d uniform in 0..min(max_staleness,
    step); log π_behave = ``actor``'s logprobs at the time of the call + ``noise``·N(0, 1).

    One generator, seeded with ``seed``, draws d, the noise and the rewards, step after step; the
    token ids come from ``random_tokens`` seeded ``seed·1000 + step``.
    """

    actor: Any
    n_seqs: int
    seq_len: int
    prompt_len: int
    max_staleness: int
    seed: int = 0
    noise: float = 0.1

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def batch(self, step: int) -> Rollout:
        g = self.generator
        ids, loss_mask = random_tokens(self.n_seqs, self.seq_len, self.prompt_len, seed=self.seed * 1000 + step)
        d = torch.randint(0, min(self.max_staleness, step) + 1, (self.n_seqs, 1), generator=g)
        versions = torch.where(loss_mask.bool(), step - d, -1)
        behave = _noisy_logprobs(self.actor, ids, loss_mask, self.noise, g)
        return Rollout(ids, loss_mask, versions, behave, _coin_rewards(self.n_seqs, g))


@dataclass
class ScoredStream:
    """Random tokens scored by the snapshot of each token's version, through the actor ``scorer``.

    Sequence i's response is tagged ``step − d_i`` (d_i uniform in 0..min(max_staleness, step));
    every odd sequence with d_i ≥ 1 switches to version ``step − d_i + 1`` from position
    ``(prompt_len + seq_len) // 2`` on: the engine picked up new weights mid-response, and AReaL's
    inference engine records each token's own version. Step ``step``'s batch is drawn from a
    generator seeded ``seed·1000 + step`` (token ids from ``random_tokens`` with the same seed).
    """

    scorer: Any
    snapshots: list[torch.Tensor]
    n_seqs: int
    seq_len: int
    prompt_len: int
    max_staleness: int
    seed: int = 0

    def versions(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """Each token's version ([n_seqs, seq_len], −1 on the prompt), d drawn from ``generator``."""
        versions = torch.full((self.n_seqs, self.seq_len), -1)
        for i in range(self.n_seqs):
            v = step - int(torch.randint(0, min(self.max_staleness, step) + 1, (1,), generator=generator))
            versions[i, self.prompt_len :] = v
            if i % 2 == 1 and v < step:  # the engine picked up new weights mid-response
                versions[i, (self.prompt_len + self.seq_len) // 2 :] = v + 1
        return versions

    def batch(self, step: int) -> Rollout:
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        ids, loss_mask = random_tokens(self.n_seqs, self.seq_len, self.prompt_len, seed=self.seed * 1000 + step)
        versions = self.versions(step, g)
        behave = torch.zeros(ids.shape)
        for v in versions.unique().tolist():
            if v < 0:
                continue
            load_parameters(self.scorer, self.snapshots[v])
            behave = torch.where(versions == v, token_logprobs(self.scorer, ids), behave)
        return Rollout(ids, loss_mask, versions, behave * loss_mask, _coin_rewards(self.n_seqs, g))


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


@dataclass
class SampledStream:
    """Responses sampled by ``sampler`` loaded with the snapshot of their version.

    Per batch: ``prompts(generator)`` draws the prompts ([n, P]); each prompt gets a staleness d,
    uniform in 0..min(max_staleness, step) from the generator, or a fixed ``staleness`` (the call's,
    else the stream's) drawing nothing; its ``group`` responses of ``new_tokens`` tokens are sampled by the
    snapshot of version ``step − d`` (groups of equal d together, in increasing d) and tagged with
    it; ``reward(prompts, responses)`` scores each row. Rows are prompt-major (``group`` per prompt).

    The generator is the stream's own, carried from batch to batch (``generator``), or a fresh one
    per batch seeded ``seed + step`` (``seed``), or the call's ``seed``.
    """

    sampler: Sampler
    snapshots: list[torch.Tensor]
    prompts: Callable[[torch.Generator], torch.Tensor]
    new_tokens: int
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    group: int = 1
    max_staleness: int = 0
    staleness: int | None = None
    generator: torch.Generator | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.seed is None):
            raise ValueError("SampledStream: give either a generator (carried over) or a seed (one generator per batch).")

    def batch(self, step: int, *, staleness: int | None = None, seed: int | None = None) -> Rollout:
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
        elif self.generator is not None:
            g = self.generator
        else:
            g = torch.Generator().manual_seed(self.seed + step)
        prompts = self.prompts(g)
        n, P = prompts.shape
        if staleness is None:
            staleness = self.staleness
        if staleness is None:
            ds = torch.randint(0, min(self.max_staleness, step) + 1, (n,), generator=g)
        else:
            ds = torch.full((n,), staleness)
        ids = torch.zeros(n * self.group, P + self.new_tokens, dtype=torch.long)
        logprobs = torch.zeros(ids.shape)
        versions = torch.full(ids.shape, -1)
        for d in ds.unique().tolist():
            rows = [i for i in range(n) if ds[i] == d]
            sel = torch.tensor([i * self.group + k for i in rows for k in range(self.group)])
            self.sampler.load(self.snapshots[step - d])
            out, lp = self.sampler.sample(prompts[rows].repeat_interleave(self.group, 0), self.new_tokens, generator=g)
            ids[sel], logprobs[sel] = out, lp
            versions[sel, P:] = step - d
        loss_mask = torch.zeros(ids.shape, dtype=torch.int32)
        loss_mask[:, P:] = 1
        return Rollout(ids, loss_mask, versions, logprobs, self.reward(ids[:, :P], ids[:, P:]), group_size=self.group)
