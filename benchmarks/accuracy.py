"""π_prox accuracy: every approximation against AReaL's recomputed π_prox, by staleness and minibatch.

    python -m benchmarks.accuracy [--max-staleness 8] [--minibatches 1 2 4] [--json out.json] [--plot out.png]

Realistic staleness on the real AReaL FSDP actor (tiny Qwen2, CPU): for each n, the policy is
first trained for ``--max-staleness`` steps (AReaL's recompute with ``ppo_n_minibatches`` n, on its
own samples, rewarded for emitting digits) to get weight snapshots at versions 0..K. Then, for each staleness d and each ``ppo_n_minibatches`` n, a fresh actor at
version k = K takes one PPO step on a batch **sampled** by the snapshot k − d (the toy inference
engine, ``benchmarks.harness.streams.SampledStream``; every response token has version k − d,
prompt −1). The history runs through the harness's loop (``benchmarks.harness.loop``).

The step trains on the recomputed π_prox (the plugin's fallback mode, so θ follows AReaL's
recompute path exactly) while the plugin's audit measures, in every minibatch j, each method's
π_prox against the recomputed one: the a3po anchors ``paper`` and ``recompute`` with both
interpolations, and AReaL's built-in ``loglinear`` (its formula on its unaligned versions).
Reported: mean and max |Δ log π_prox|, behaviour-weight error |Δ π_prox/π_behave|, the share of
tokens whose PPO clip decision differs, by staleness and by minibatch index.

Next to the methods, an **oracle**: in each (n, d, j) bucket, the single α fitted after the fact to
the truth (``oracle_alpha``: the α of log π̂ = α·log π_behave + (1 − α)·log π_θ with the least mean
|Δ log π_prox| over the bucket's tokens, given the same π_behave, π_θ and recomputed π_prox the audit
sees). It bounds from below what any one-α-per-bucket loglinear interpolation of these two inputs
can reach (both a3po anchors with ``loglinear``); the ``linear`` form and AReaL's ``loglinear`` (whose
α differs on each response's first token) are other families and may come out below it in a bucket.
Every method's error is also reported as a multiple of the oracle's, and the oracle's α next to the
anchors' α.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import statistics
import tempfile
from dataclasses import dataclass
from unittest import mock

import torch

from areal_a3po.audit import token_errors
from areal_a3po.proximal import ANCHORS, loglinear_interpolation
from benchmarks.harness.loop import AUDIT_PREFIX
from benchmarks.harness.tasks import digit_share
from benchmarks import output
from benchmarks.output import figure, table

#: The approximations measured, label -> (interpolation of the actor that measures it, its stats
#: prefix under ``a3po/audit/``): not variants of ``benchmarks.harness.variants``, rows of the audit.
APPROXIMATIONS = {
    "a3po recompute/loglinear": ("loglinear", ""),
    "a3po paper/loglinear": ("loglinear", "anchor_paper/"),
    "a3po recompute/linear": ("linear", ""),
    "a3po paper/linear": ("linear", "anchor_paper/"),
    "AReaL loglinear": ("loglinear", "areal_loglinear/"),
}
AUDIT = AUDIT_PREFIX
TARGET_METHOD, BASELINE = "a3po recompute/loglinear", "AReaL loglinear"
#: The oracle's label (a row next to APPROXIMATIONS) and the anchors whose α is shown next to its fitted α.
ORACLE, SHOWN_ANCHORS = "oracle", ("recompute", "paper")
#: Errors this small count as equal in the ratios to the oracle (n = 1 gives exact zeros).
RATIO_FLOOR = 1e-12


def oracle_alpha(
    behave: torch.Tensor, theta: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one α whose loglinear π̂_prox is closest to the truth on the masked tokens, and its error.

    With b = log π_behave, θ = log π_θ (detached), p = the recomputed log π_prox, x = b − θ and
    y = p − θ, it minimises over α (unconstrained)

        E(α) = mean_t |α·b_t + (1 − α)·θ_t − p_t| = mean_t |α·x_t − y_t|
             = (1/N)·( Σ_{x_t≠0} |x_t|·|α − y_t/x_t| + Σ_{x_t=0} |y_t| ),

    a convex, piecewise linear function, so α* is the |x_t|-weighted median of r_t = y_t/x_t: with
    r sorted ascending and C_i the running sum of the |x| in that order, α* = r_i for the first i
    with C_i ≥ C_last/2 (the lower weighted median; where C_i = C_last/2 exactly, every α in
    [r_i, r_{i+1}] is optimal). The best α within [0, 1] is clamp(α*, 0, 1), by convexity.

    No masked-in token with x ≠ 0: E is constant and α* = 0 (π_θ). No masked-in token at all:
    (NaN, NaN), like ``AuditTotals.reduce``. Masked-out positions may hold anything (NaN, ±inf).
    Any non-empty shape, all four equal; float64, free of host syncs. Returns 0-d tensors (α*, E(α*)).
    """
    mask = mask.bool()
    b, t, p = (torch.where(mask, v.detach().double(), 0.0) for v in (behave, theta, truth))
    x, y = b - t, p - t
    r = torch.where(x != 0, y / torch.where(x != 0, x, 1.0), 0.0).flatten()
    r, order = r.sort()
    cum = x.abs().flatten()[order].cumsum(0)
    i = torch.searchsorted(cum, cum[-1:] / 2).clamp(max=cum.numel() - 1)
    alpha = torch.where(cum[-1] > 0, r[i][0], 0.0)
    alpha = torch.where(mask.any(), alpha, torch.nan)
    return alpha, (alpha * x - y).abs().sum() / mask.sum()


def over_oracle(error: float, oracle_error: float) -> float:
    """A method's error as a multiple of the oracle's, (e + ε)/(e_oracle + ε) with ε = ``RATIO_FLOOR``."""
    return (error + RATIO_FLOOR) / (oracle_error + RATIO_FLOOR)


@contextlib.contextmanager
def audited_inputs():
    """Collect what the plugin's audit sees in each micro-batch while it runs unchanged.

    Yields a list that fills with one dict per audited micro-batch: ``minibatch`` j, ``behave``,
    ``theta`` (detached), ``truth`` (recomputed π_prox), ``tokens`` (the audited ones), ``advantages``
    and the clip ε's. Wraps ``areal_a3po.loss.record_audit`` for the duration of the ``with`` only.
    """
    from areal_a3po import loss as plugin

    audit, seen = plugin.record_audit, []

    def capture(inputs, step_audit):
        seen.append(dict(
            minibatch=inputs.minibatch, behave=inputs.behave.detach().clone(), theta=inputs.theta.detach().clone(),
            truth=inputs.truth.detach().clone(), tokens=inputs.tokens.clone(),
            advantages=inputs.advantages.detach().clone(), eps_clip=inputs.eps_clip,
            eps_clip_higher=inputs.eps_clip_higher,
        ))
        return audit(inputs, step_audit)

    with mock.patch.object(plugin, "record_audit", capture):
        yield seen


def _bucket_errors(parts: list[dict]) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """The oracle's α of one bucket (its micro-batches ``parts``) and its per-token errors, measured
    like the audit measures the methods: log π̂ in the actor's dtype, then ``token_errors``."""
    cat = lambda key: torch.cat([part[key].flatten() for part in parts])  # noqa: E731
    b, t, p, tokens, advantages = (cat(k) for k in ("behave", "theta", "truth", "tokens", "advantages"))
    alpha, _ = oracle_alpha(b, t, p, tokens)
    approx = loglinear_interpolation(b.to(t.dtype), t, alpha.to(t.dtype))
    errors = token_errors(approx, p, b, t, advantages, eps_clip=parts[0]["eps_clip"], eps_clip_higher=parts[0]["eps_clip_higher"])
    return alpha.item(), errors, tokens


def _oracle_cell(n: int, d: int, K: int, seen: list[dict]) -> dict:
    """The oracle's cell for (n, d) from one step's audited micro-batches: per j its α and errors, and
    over the step the token means of the same four figures as the methods' cells."""
    alphas, by_minibatch, errors, tokens = [], [], [], []
    for j in range(n):
        alpha, errs, tok = _bucket_errors([part for part in seen if part["minibatch"] == j])
        alphas.append(alpha)
        by_minibatch.append(errs["abs_error"][tok].mean().item())
        errors.append(errs)
        tokens.append(tok)
    tok = torch.cat(tokens)
    mean = lambda key: torch.cat([e[key] for e in errors])[tok].mean().item()  # noqa: E731
    version = torch.tensor([K - d])
    return dict(
        minibatches=n, staleness=d, method=ORACLE,
        abs_error=mean("abs_error"), max_abs_error=torch.cat([e["abs_error"] for e in errors])[tok].max().item(),
        behave_weight_error=mean("behave_imp_weight_abs_error"), clip_disagreement=mean("clip_disagreement"),
        by_minibatch=by_minibatch, alpha_by_minibatch=alphas,
        anchor_alpha_by_minibatch={a: [ANCHORS.get(a)(version, K, j, n).item() for j in range(n)] for a in SHOWN_ANCHORS},
    )


@dataclass(frozen=True)
class Settings:
    """The run: for each ``ppo_n_minibatches`` in ``minibatches``, ``max_staleness`` (K) steps of
    history, then one step per staleness 0..K, on batches of ``n_seqs`` sequences of ``prompt_len``
    random prompt tokens and ``new_tokens`` sampled ones."""

    max_staleness: int = 8
    minibatches: tuple[int, ...] = (1, 2, 4)
    n_seqs: int = 16
    prompt_len: int = 8
    new_tokens: int = 16
    lr: float = 2e-3
    seed: int = 0


def run(settings: Settings = Settings(), *, progress=None) -> dict:
    """Every (n, d) cell of every approximation and the oracle, and ``summarize``'s summary."""
    with tempfile.TemporaryDirectory(prefix="a3po-accuracy-") as workdir:
        cells = _measure(workdir, settings, progress)
    out = dataclasses.asdict(settings)
    out["minibatches"] = list(settings.minibatches)
    return dict(settings=out, cells=cells, summary=summarize(cells))


def _measure(workdir: str, s: Settings, progress) -> list[dict]:
    from areal.utils import stats_tracker

    from benchmarks.harness.actor import load_parameters, make_actor, parameters, train_step
    from benchmarks.harness.loop import Lane, run_interleaved
    from benchmarks.harness.models import build_model
    from benchmarks.harness.streams import SampledStream, Sampler, random_prompts

    K = s.max_staleness
    model = build_model(f"{workdir}/model", "toy", seed=s.seed)
    sampler = Sampler(model)

    cells = []  # one per (n, d, method)
    for n in s.minibatches:
        # One actor per n, in the plugin's recompute (fallback) mode: it trains exactly like AReaL's
        # recompute while its audit measures every approximation. History: K on-policy steps,
        # snapshots at versions 0..K; then, from the same weights *and optimizer state* at version
        # K, one step per (staleness, interpolation).
        actor = make_actor(
            model, prox_logp_method="a3po", anchor="recompute", ppo_n_minibatches=n, max_tokens_per_mb=s.prompt_len + s.new_tokens,
            lr=s.lr, a3po_options={"audit_interval": 1, "fallback": {"threshold": 1e9, "recover_after": 0}},
        )
        actor.actor.load_state_dict({"fallback": {"mode": "recompute"}})
        snapshots = [parameters(actor)]
        # Batch at version v: a generator seeded seed·7919 + v; the history is on-policy (d = 0).
        stream = SampledStream(sampler, snapshots, prompts=random_prompts(s.n_seqs, s.prompt_len), new_tokens=s.new_tokens,
                               reward=lambda prompts, responses: digit_share(responses), staleness=0, seed=s.seed * 7919)
        run_interleaved([Lane(f"history n={n}", actor, stream, snapshots=snapshots)], K)
        optimizer_state = copy.deepcopy(actor.optimizer.state_dict())
        for d in range(K + 1):
            rollout = stream.batch(K, staleness=d, seed=s.seed * 7919 + 1000 + 10 * n + d)
            for interpolation in ("loglinear", "linear"):
                load_parameters(actor, snapshots[K])
                actor.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
                actor.config.a3po.interpolation = interpolation  # read by the next update
                stats_tracker.export_all()
                with audited_inputs() as seen:
                    train_step(actor, rollout.trajectories(), version=K)
                stats = stats_tracker.export_all()
                if interpolation == "loglinear":  # the linear step trains identically: one oracle per (n, d)
                    oracle = _oracle_cell(n, d, K, seen)
                    cells.append(oracle)
                for method, (interp, prefix) in APPROXIMATIONS.items():
                    if interp != interpolation:
                        continue
                    cells.append(dict(
                        minibatches=n, staleness=d, method=method,
                        abs_error=stats[f"{AUDIT}{prefix}abs_error/avg"],
                        max_abs_error=stats[f"{AUDIT}{prefix}abs_error/max"],
                        behave_weight_error=stats[f"{AUDIT}{prefix}behave_imp_weight_abs_error/avg"],
                        clip_disagreement=stats[f"{AUDIT}{prefix}clip_disagreement/avg"],
                        by_minibatch=[stats[f"{AUDIT}minibatch_{j}/{prefix}abs_error/avg"] for j in range(n)],
                    ))
                    cells[-1]["over_oracle"] = over_oracle(cells[-1]["abs_error"], oracle["abs_error"])
                    cells[-1]["over_oracle_by_minibatch"] = [
                        over_oracle(e, o) for e, o in zip(cells[-1]["by_minibatch"], oracle["by_minibatch"])
                    ]
                if progress is not None:
                    progress()
        del actor
    return cells


def summarize(cells: list[dict]) -> dict:
    """Per (n, method), the oracle included: mean error over staleness, per-minibatch means; each
    method's error as a multiple of the oracle's; the oracle's α per (d, j) next to the anchors';
    the same multiples over all (n, d); and the two targets."""
    out: dict = {"by_minibatches": {}}
    for n in sorted({c["minibatches"] for c in cells}):
        per_method = {}
        for method in (*APPROXIMATIONS, ORACLE):
            mine = [c for c in cells if c["minibatches"] == n and c["method"] == method]
            per_method[method] = dict(
                abs_error=statistics.fmean(c["abs_error"] for c in mine),
                max_abs_error=max(c["max_abs_error"] for c in mine),
                behave_weight_error=statistics.fmean(c["behave_weight_error"] for c in mine),
                clip_disagreement=statistics.fmean(c["clip_disagreement"] for c in mine),
                by_minibatch=[statistics.fmean(c["by_minibatch"][j] for c in mine) for j in range(n)],
            )
        oracle = per_method[ORACLE]
        for method in APPROXIMATIONS:
            s = per_method[method]
            s["over_oracle"] = over_oracle(s["abs_error"], oracle["abs_error"])
            s["over_oracle_by_minibatch"] = [over_oracle(e, o) for e, o in zip(s["by_minibatch"], oracle["by_minibatch"])]
        # α on π_behave, [d][j]: the oracle's fit and the anchors'
        mine = sorted((c for c in cells if c["minibatches"] == n and c["method"] == ORACLE), key=lambda c: c["staleness"])
        oracle["alpha_by_staleness"] = {ORACLE: [c["alpha_by_minibatch"] for c in mine]} | {
            f"anchor {a}": [c["anchor_alpha_by_minibatch"][a] for c in mine] for a in SHOWN_ANCHORS
        }
        out["by_minibatches"][str(n)] = per_method
    mean_of = lambda method: statistics.fmean(c["abs_error"] for c in cells if c["method"] == method)  # noqa: E731
    out["overall"] = {
        "oracle_abs_error": mean_of(ORACLE),
        "over_oracle": {method: over_oracle(mean_of(method), mean_of(ORACLE)) for method in APPROXIMATIONS},
    }
    one = out["by_minibatches"].get("1")
    four = out["by_minibatches"].get("4")
    out["targets"] = {
        "recompute_anchor_max_error_1_minibatch": one[TARGET_METHOD]["max_abs_error"] if one else None,
        "areal_over_recompute_anchor_mean_error_4_minibatches": (
            four[BASELINE]["abs_error"] / max(four[TARGET_METHOD]["abs_error"], 1e-12) if four else None
        ),
    }
    return out


def format_tables(result: dict) -> str:
    cells, K = result["cells"], result["settings"]["max_staleness"]
    lines = []
    for n, per_method in result["summary"]["by_minibatches"].items():
        d_columns = [f"d={d}" for d in range(K + 1)]

        def by_staleness(method: str, key: str) -> dict[int, float]:
            return {c["staleness"]: c[key] for c in cells if c["minibatches"] == int(n) and c["method"] == method}

        errors = []
        for method, s in per_method.items():
            row = by_staleness(method, "abs_error")
            errors.append([method, *(f"{row[d]:.1e}" for d in range(K + 1)), f"{s['abs_error']:.2e}",
                           f"{s['max_abs_error']:.2e}", f"{s['behave_weight_error']:.2e}",
                           f"{s['clip_disagreement']:.2%}"])
        ratios = []
        for method in APPROXIMATIONS:
            row = by_staleness(method, "over_oracle")
            ratios.append([method, *(f"{row[d]:.3g}" for d in range(K + 1)),
                           f"{per_method[method]['over_oracle']:.3g}"])
        alphas = per_method[ORACLE]["alpha_by_staleness"]
        alpha_rows = [[f"j={j} {name}", *(f"{by_d[d][j] + 0.0:.3f}" for d in range(K + 1))]
                      for j in range(int(n)) for name, by_d in alphas.items()]
        lines.append(f"\nppo_n_minibatches={n}: mean |Δ log π_prox| by staleness d")
        lines.append(table(errors, ["method", *d_columns, "all", "max", "|Δ w|", "clip≠"]))
        lines.append(table(ratios, ["error ÷ oracle error", *d_columns, "all"]))
        if int(n) > 1:
            lines.append("  by minibatch j (mean over d): " + "; ".join(
                f"{m}: " + " ".join(f"{e:.1e}" for e in s["by_minibatch"]) for m, s in per_method.items()
            ))
            lines.append("  by minibatch j, error ÷ oracle error: " + "; ".join(
                f"{m}: " + " ".join(f"{r:.3g}" for r in per_method[m]["over_oracle_by_minibatch"]) for m in APPROXIMATIONS
            ))
        lines.append("α on π_behave (oracle: fitted to the truth; anchors: their formulas)")
        lines.append(table(alpha_rows, ["per j", *d_columns]))
    overall = result["summary"]["overall"]
    lines.append(f"\noracle (one α per (n, d, j), fitted to the truth): mean |Δ log π_prox| over all (n, d) "
                 f"{overall['oracle_abs_error']:.2e}")
    lines.append("error ÷ oracle error over all (n, d): " + "; ".join(f"{m} {r:.3g}" for m, r in overall["over_oracle"].items()))
    t = result["summary"]["targets"]
    if t["recompute_anchor_max_error_1_minibatch"] is not None:
        lines.append(f"\nanchor 'recompute' with 1 minibatch, max |Δ log π_prox|: {t['recompute_anchor_max_error_1_minibatch']:.1e}"
                     " (exact: π_θ is π at the trainer's version there)")
    if t["areal_over_recompute_anchor_mean_error_4_minibatches"] is not None:
        r = t["areal_over_recompute_anchor_mean_error_4_minibatches"]
        lines.append(f"AReaL loglinear's mean error over anchor 'recompute''s, 4 minibatches: {r:.1f}x")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Top: error vs staleness, one line per method and the oracle (dashed). Bottom: the oracle's α
    per minibatch j (markers) and the recompute anchor's (dashed, same colour) and the paper's (grey)."""
    groups = result["summary"]["by_minibatches"]
    with figure(path, 2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False, sharey="row") as (_, axes):
        for col, n in enumerate(groups):
            _error_panel(axes[0][col], result["cells"], int(n))
            _alpha_panel(axes[1][col], groups[n][ORACLE]["alpha_by_staleness"], int(n))
        axes[0][0].set_ylabel("mean |Δ log π_prox| (floor 1e-9)")
        axes[1][0].set_ylabel("α on π_behave")
        axes[0][-1].legend(fontsize=7)


def _error_panel(ax, cells: list[dict], n: int) -> None:
    for method in (*APPROXIMATIONS, ORACLE):
        pts = sorted((c["staleness"], c["abs_error"]) for c in cells if c["minibatches"] == n and c["method"] == method)
        style = dict(color="black", ls="--") if method == ORACLE else {}
        ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], marker="o", ms=3, label=method, **style)
    ax.set_yscale("log")
    ax.set_title(f"ppo_n_minibatches={n}")


def _alpha_panel(ax, alphas: dict[str, list[list[float]]], n: int) -> None:
    ds = range(len(alphas[ORACLE]))
    ax.plot(ds, [a[0] for a in alphas["anchor paper"]], color="grey", lw=1, label="anchor paper")
    for j in range(n):
        line, = ax.plot(ds, [a[j] for a in alphas[ORACLE]], marker="o", ms=3, ls="none", label=f"oracle j={j}")
        ax.plot(ds, [a[j] for a in alphas["anchor recompute"]], color=line.get_color(), ls="--", lw=1,
                label=f"anchor recompute j={j}")
    ax.set_xlabel("staleness d = k − v")
    ax.legend(fontsize=6)


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--max-staleness", type=int, default=8, help="K: staleness 0..K, trainer at version K")
    parser.add_argument("--minibatches", type=int, nargs="+", default=[1, 2, 4], help="ppo_n_minibatches values")
    parser.add_argument("--seqs", type=int, default=16, help="sequences per batch")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16, help="sampled response tokens per sequence")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    output.output_options(parser, plot="draw error vs staleness (one line per method) to this PNG")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    total = 2 * len(args.minibatches) * (args.max_staleness + 1)
    with tqdm(total=total, desc="(n, d, interpolation)", unit="step") as bar:
        settings = Settings(max_staleness=args.max_staleness, minibatches=tuple(args.minibatches), n_seqs=args.seqs,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens, lr=args.lr, seed=args.seed)
        result = run(settings, progress=bar.update)
    print(format_tables(result))
    output.save(result, args, functools.partial(plot, result))
    return result


if __name__ == "__main__":
    main()
