"""Synthetic stand-ins for timing runs on any GPU box: nothing downloaded, no weights or datasets needed.

- ``build_synthetic_model(path, shape)``: a randomly initialised Qwen2 of a shipped shape
  (``areal_a3po/models/<shape>.json``: ``qwen2.5-1.5b`` is Qwen2.5-1.5B-Instruct's architecture) and
  a word-level tokenizer that covers its whole vocabulary (digits and symbols, then ``<tN>`` fillers),
  with a minimal chat template, so AReaL's RLVR workflow, SGLang and the trainer all load it.
- ``synthetic_dataset(n)``: prompts ``"3 1 4 ="`` with answer ``"4 1 3"`` (reverse the digits),
  in the ``messages`` / ``answer`` format of AReaL's GSM8K dataset.
- ``reward_fn``: AReaL's reward-function signature; position by position, 1 − |digit − target|/9
  for a digit and 0 for anything else (cheap, verifiable, and dense enough for a random model to learn).

``python -m areal_a3po.train`` uses them when the config has ``synthetic.model: <shape>``.
"""

from __future__ import annotations

import json
import os
import random
from importlib import resources
from pathlib import Path

__all__ = ["MODEL_SHAPES", "build_synthetic_model", "model_shape", "reward_fn", "synthetic_dataset"]

#: Shapes shipped in ``areal_a3po/models/<name>.json`` (``synthetic.model`` in the experiment config).
MODEL_SHAPES = ("cpu-tiny", "qwen2.5-1.5b", "tiny")
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
SYMBOLS = ["<pad>", "<eos>", "<bos>", "=", "?"] + [str(i) for i in range(10)]


def model_shape(name: str) -> dict:
    """The shipped architecture ``name`` as a config dict (keys starting with ``_`` dropped)."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {list(MODEL_SHAPES)}.")
    text = resources.files("areal_a3po").joinpath("models", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_synthetic_model(path: str | os.PathLike, shape: str, *, weights: bool = True, seed: int = 0) -> str:
    """Write config, tokenizer and (``weights=True``) random weights of ``shape`` to ``path``.

    Without weights it is the cheap part of a dry run: config.json and the tokenizer only.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = model_shape(shape)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = SYMBOLS + [f"<t{i}>" for i in range(len(SYMBOLS), spec["vocab_size"])]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="?")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)
    dtype = getattr(torch, spec.pop("torch_dtype", "float32"))
    config = Qwen2Config(**spec, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.torch_dtype = dtype
    config.save_pretrained(path)
    if weights:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=dtype)
        model.save_pretrained(path, safe_serialization=True)
    return str(path)


def synthetic_dataset(n: int, *, seed: int = 0, digits: int = 4):
    """``n`` digit-reversal prompts as a ``datasets.Dataset`` of ``messages`` and ``answer``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ds = [str(rng.randrange(10)) for _ in range(digits)]
        rows.append({"messages": [{"role": "user", "content": " ".join(ds) + " ="}], "answer": " ".join(reversed(ds))})
    return Dataset.from_list(rows)


def reward_fn(prompt, completions, prompt_ids, completion_ids, answer, **kwargs) -> float:
    """Mean over the answer's positions i of ``1 − |g_i − a_i|/9`` when the completion's i-th token
    g_i is a digit, 0 when it is not (or missing): 1 for the exact reversal, partial credit for
    digits near the right one, so that a random model gets a signal it can climb from the first step.
    """
    want = str(answer).split()
    got = str(completions).split()[: len(want)]
    score = sum(1 - abs(int(g) - int(a)) / 9 for a, g in zip(want, got) if g.isdigit() and len(g) == 1)
    return score / max(len(want), 1)
