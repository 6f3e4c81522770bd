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
