"""The trainer's phases on a GPU, without AReaL: what the recompute forward costs and what A-3PO adds.

    python -m benchmarks.gpu_phases [--seqs 8] [--seq-len 2048] [--repeats 10] [--json out.json]

A random model of Qwen2.5-1.5B-Instruct's shape (``benchmarks/harness/shapes/qwen2.5-1.5b.json``, bf16,
SDPA attention, gradient checkpointing off) on one CUDA device, one micro-batch of ``--seqs`` ×
``--seq-len`` tokens. Timed, interleaved in each repetition, CUDA-synchronised:

- ``recompute``: the forward pass without gradient and the token logprobs (AReaL's recompute_logp);
- ``train``: forward with gradient, the token logprobs, a stand-in loss and backward (the update's
  compute, without the optimizer step);
- ``a3po``: ``areal_a3po.approximate_prox_logp`` on those logprobs (both anchors): what A-3PO adds.

Reported: medians and IQR; the recompute share of a recompute step, ``R / (R + T)``; and A-3PO's
cost against the limit ``T`` (the step without its recompute phase). It needs only torch and
transformers, so it runs on any GPU box (AReaL's own loop on GPUs is ``benchmarks.e2e_speedup``).
"""

from __future__ import annotations

import statistics
import time

from benchmarks import output
from benchmarks.output import table


def _timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def run(seqs: int = 8, seq_len: int = 2048, repeats: int = 10, warmup: int = 3, device: str = "cuda", shape: str = "qwen2.5-1.5b") -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from areal_a3po.proximal import approximate_prox_logp
    from benchmarks.harness.models import model_shape

    spec = model_shape(shape)
    dtype = getattr(torch, spec.pop("torch_dtype", "bfloat16"))
    config = Qwen2Config(**spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.5B model's init on the CPU takes long
        model = Qwen2ForCausalLM(config).to(dtype=dtype)
    model.train()
    ids = torch.randint(0, config.vocab_size, (seqs, seq_len), device=device)
    labels = torch.roll(ids, -1, dims=-1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def token_logp(logits):
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def recompute():
        with torch.no_grad():
            out["prox"] = token_logp(model(input_ids=ids).logits)

    def train():
        logp = token_logp(model(input_ids=ids).logits)
        (-logp.mean()).backward()
        out["theta"] = logp.detach()
        model.zero_grad(set_to_none=True)

    k = 8
    versions = torch.randint(k - 4, k + 1, (seqs, seq_len), device=device, dtype=torch.int32)
    mask = torch.ones(seqs, seq_len, dtype=torch.bool, device=device)

    def a3po(anchor):
        def f():
            out[anchor] = approximate_prox_logp(out["behave"], out["theta"], versions, k, anchor=anchor,
                                                minibatch=1, n_minibatches=2, loss_mask=mask)
        return f

    out: dict = {}
    recompute()
    out["behave"] = out["prox"] + 0.01 * torch.randn_like(out["prox"])
    train()
    phases = {"recompute": recompute, "train": train, "a3po paper": a3po("paper"), "a3po recompute": a3po("recompute")}
    times: dict[str, list[float]] = {p: [] for p in phases}
    for i in range(warmup + repeats):
        for name, fn in phases.items():
            t = _timed(fn, sync)
            if i >= warmup:
                times[name].append(t)
    med = {p: statistics.median(v) for p, v in times.items()}
    iqr = {p: (statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]) for p, v in times.items()}
    r, t = med["recompute"], med["train"]
    result = dict(
        device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
        torch=torch.__version__, shape=shape, parameters=sum(p.numel() for p in model.parameters()),
        seqs=seqs, seq_len=seq_len, repeats=repeats, median_seconds=med, iqr_seconds=iqr,
        recompute_share=r / (r + t),
        a3po_over_limit={a: med[a] / t for a in ("a3po paper", "a3po recompute")},
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    )
    return result


def format_table(res: dict) -> str:
    m, q = res["median_seconds"], res["iqr_seconds"]
    rows = [[p, f"{m[p] * 1e3:.2f}", f"{q[p][0] * 1e3:.2f}-{q[p][1] * 1e3:.2f}"] for p in m]
    lines = [f"{res['device']}, torch {res['torch']}, {res['shape']} ({res['parameters'] / 1e9:.2f}B), "
             f"{res['seqs']} x {res['seq_len']} tokens, medians of {res['repeats']}:",
             table(rows, ["phase", "median ms", "IQR ms"]),
             f"recompute share of a recompute step: {res['recompute_share']:.1%}"]
    lines += [f"{a}: +{x:.3%} of the limit (the step without recompute)" for a, x in res["a3po_over_limit"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="qwen2.5-1.5b", help="a shape in benchmarks/harness/shapes")
    output.output_options(parser)
    args = parser.parse_args(argv)
    res = run(args.seqs, args.seq_len, args.repeats, device=args.device, shape=args.shape)
    print(format_table(res))
    output.save(res, args)
    return res


if __name__ == "__main__":
    main()
