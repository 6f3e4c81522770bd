"""A tiny, locally built Qwen2 and AReaL's FSDP actor on CPU: the harness for the demo, tests and benchmarks.

Nothing is downloaded: the tokenizer is a word-level vocabulary of digits and a few symbols, the
model is a randomly initialised 4-layer Qwen2, both saved to a folder of the caller's choosing.
The actor runs in AReaL's SPMD mode with world size 1, float32, SDPA attention, a constant
learning rate without warm-up and one sequence per micro-batch (packed micro-batches leak attention
across sequences on CPU).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = ["<pad>", "<eos>", "<bos>", "+", "=", "?", " "] + [str(i) for i in range(10)] + [
    chr(ord("a") + i) for i in range(26)
]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def build_tiny_model(path: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 4) -> str:
    """Write a random Qwen2 causal LM and a word-level tokenizer to ``path``; return the path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="?"
    )
    hf_tok.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process_env() -> None:
    """Environment for AReaL's SPMD mode with one CPU rank (idempotent)."""
    os.environ.setdefault("AREAL_SPMD_MODE", "1")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def make_actor(
    model_path: str,
    *,
    prox_logp_method: str = "recompute",
    anchor: str = "paper",
    interpolation: str = "loglinear",
    ppo_n_minibatches: int = 1,
    lr: float = 1e-3,
    max_tokens_per_mb: int = 64,
    plugin: bool = True,
    total_steps: int = 1000,
    a3po_options: dict[str, Any] | None = None,
    **overrides: Any,
):
    """An initialised FSDP PPO actor on CPU: the plugin's ``A3POFSDPActor`` or, with
    ``plugin=False``, AReaL's own ``FSDPPPOActor`` (then ``prox_logp_method`` must be AReaL's).

    ``max_tokens_per_mb`` should be at most one sequence's length, so that each micro-batch holds
    one sequence. Decoupled loss, rejection sampling as in AReaL's examples (ratio ≤ 5), no KL.
    ``a3po_options`` go to ``A3POConfig`` next to ``anchor`` and ``interpolation`` (e.g.
    ``{"audit_interval": 1, "fallback": {"threshold": 0.01}}``).
    """
    setup_single_process_env()
    from areal.api import FinetuneSpec
    from areal.api.alloc_mode import ParallelStrategy
    from areal.api.cli_args import MicroBatchSpec, OptimizerConfig, PPOActorConfig, RejectionSamplingConfig

    kwargs: dict[str, Any] = dict(
        experiment_name="a3po-toy",
        trial_name="t0",
        path=str(model_path),
        attn_impl="sdpa",
        dtype="float32",
        optimizer=OptimizerConfig(lr=lr, lr_scheduler_type="constant", warmup_steps_proportion=0.0, gradient_clipping=1.0),
        mb_spec=MicroBatchSpec(max_tokens_per_mb=max_tokens_per_mb),
        use_decoupled_loss=True,
        prox_logp_method=prox_logp_method,
        ppo_n_minibatches=ppo_n_minibatches,
        kl_ctl=0.0,
        eps_clip=0.2,
        rejection_sampling=RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=5.0),
    )
    kwargs.update(overrides)
    if plugin:
        from areal_a3po.actor import A3POFSDPActor
        from areal_a3po.config import A3POActorConfig, A3POConfig, FallbackConfig

        options = dict(a3po_options or {})
        if isinstance(options.get("fallback"), dict):
            options["fallback"] = FallbackConfig(**options["fallback"])
        a3po = A3POConfig(anchor=anchor, interpolation=interpolation, **options)
        actor = A3POFSDPActor(config=A3POActorConfig(**kwargs, a3po=a3po))
    else:
        from areal.engine import FSDPPPOActor

        actor = FSDPPPOActor(config=PPOActorConfig(**kwargs))
    actor.create_process_group(parallel_strategy=ParallelStrategy())
    actor.initialize(addr=None, ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=total_steps, train_batch_size=1))
    return actor


def parameters(actor) -> torch.Tensor:
    """All of the actor's weights as one flat float64 vector (full tensors of FSDP's DTensors)."""
    out = []
    for p in actor.model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().reshape(-1).to(torch.float64).cpu())
    return torch.cat(out)


def load_parameters(actor, flat: torch.Tensor) -> None:
    """Write a vector from ``parameters`` back into the actor's weights (world size 1)."""
    _copy_flat(actor.model, flat)


def _copy_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` into ``model``'s parameters in order (local shards of FSDP's DTensors)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            n = local.numel()
            local.copy_(flat[offset : offset + n].view_as(local).to(local.dtype))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"weight vector has {flat.numel()} values, the model {offset}.")


@dataclass
class Rollout:
    """A batch as AReaL's inference engine hands it to the trainer (per-trajectory dicts)."""

    input_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1 on generated tokens
    versions: torch.Tensor  # [B, T] version per token, -1 on the prompt
    logprobs: torch.Tensor  # [B, T] log π_behave of token t at position t (0 on the prompt)
    rewards: torch.Tensor  # [B]

    def trajectories(self) -> list[dict[str, Any]]:
        B, T = self.input_ids.shape
        return [
            dict(
                input_ids=self.input_ids[i : i + 1].clone(),
                attention_mask=torch.ones(1, T, dtype=torch.bool),
                loss_mask=self.loss_mask[i : i + 1].clone(),
                logprobs=self.logprobs[i : i + 1].clone(),
                versions=self.versions[i : i + 1].clone(),
                rewards=self.rewards[i : i + 1].clone(),
            )
            for i in range(B)
        ]


def random_tokens(n_seqs: int, seq_len: int, prompt_len: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (no special tokens) and the loss mask of the response part."""
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
        _copy_flat(self.model, flat)

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
