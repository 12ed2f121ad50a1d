"""The demo over several seeds: every claim as a mean with a 95% interval and a verdict from it.

``run_seeds`` runs (or resumes) one complete demo per seed in ``RUN_DIR/seed-<s>/`` over the same
shipped base (per-domain CPT, vectors, searches, mixture runs and test scores all repeat), then
``aggregate`` reads their summaries and ``write_seeds_report`` writes ``report.md``, ``summary.json``
and ``plots/`` (self-contained: the report links only its own plots, so the folder can be copied
elsewhere, e.g. with ``--report-dir``).

Each claim is measured per seed as a difference that is positive when the paper's claim holds
(for the cost claims: the cost ratio minus 15). Its 95% interval is Student's t over seeds; the
verdict is *reproduced* when the whole interval is above the threshold, *not reproduced* when it
is below, else *inconclusive*.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from optimer_merge.demo.pipeline import CANDIDATES, DOMAINS, SETTINGS_RECORD, DemoSettings, job_pool, run_demo
from optimer_merge.errors import ConfigError
from optimer_merge.io.progress import duration
from optimer_merge.report.plots import pyplot, save

SEEDS_RECORD = "seeds.json"
# (key, claim, what the per-seed measure is, threshold it must clear)
CLAIMS = [
    ("beats_data_mixing", "OptiMer beats data mixing (uniform ratios)", "mix-uniform − OptiMer, test mean bits/byte", 0.0),
    ("beats_velocitune", "OptiMer beats Velocitune data mixing", "mix-velocitune − OptiMer, test mean bits/byte", 0.0),
    ("beats_model_averaging", "OptiMer beats model averaging", "average − OptiMer, test mean bits/byte", 0.0),
    ("search_cost_15x", "15-35x lower search cost (search alone)", "cost ratio", 15.0),
    ("search_cost_15x_with_training", "15-35x lower search cost, counting the per-domain CPT", "cost ratio", 15.0),
    ("ratios_improve_mixture", "OptiMer's weights as ratios improve data mixing", "mix-uniform − mix-optimer, test mean bits/byte", 0.0),
    ("reoptimization_ja", "re-optimising the pool for ja improves ja", "OptiMer − OptiMer(ja), test ja bits/byte", 0.0),
    ("reoptimization_math_code", "re-optimising the pool for math+code improves them", "OptiMer − OptiMer(math+code), test math+code bits/byte", 0.0),
]


def claim_measures(n: dict) -> dict[str, float]:
    """One seed's value of each claim's measure, from that seed's report numbers."""
    mean, ja, mc = n["test_mean_bits_per_byte"], n["test_ja"], n["test_math_code"]
    return {
        "beats_data_mixing": mean["mix-uniform"] - mean["optimer"],
        "beats_velocitune": mean["mix-velocitune"] - mean["optimer"],
        "beats_model_averaging": mean["average"] - mean["optimer"],
        "search_cost_15x": n["cost_ratio_search_only"],
        "search_cost_15x_with_training": n["cost_ratio_with_training"],
        "ratios_improve_mixture": mean["mix-uniform"] - mean["mix-optimer"],
        "reoptimization_ja": ja["optimer"] - ja["optimer-ja"],
        "reoptimization_math_code": mc["optimer"] - mc["optimer-math-code"],
    }


def interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval over seeds (no interval from one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def verdict(ci: dict, threshold: float) -> str:
    if ci["low"] is None:
        return "inconclusive"
    if ci["low"] > threshold:
        return "reproduced"
    if ci["high"] < threshold:
        return "not reproduced"
    return "inconclusive"


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Means, intervals and verdicts over seeds from each seed's report numbers (summary.json)."""
    seeds = sorted(per_seed)
    runs = [per_seed[s] for s in seeds]
    over = lambda get: interval([get(n) for n in runs])  # noqa: E731
    measures = {s: claim_measures(per_seed[s]) for s in seeds}
    claims = {}
    for key, text, measure, threshold in CLAIMS:
        ci = interval([measures[s][key] for s in seeds])
        claims[key] = {"claim": text, "measure": measure, "threshold": threshold, "per_seed": {s: measures[s][key] for s in seeds},
                       **ci, "verdict": verdict(ci, threshold)}  # fmt: skip
    vec = lambda n: n["vectors"]  # noqa: E731
    kinds = list(vec(runs[0])["cosine_range_per_kind"])
    regime = {
        "relative_norm": {d: over(lambda n, d=d: vec(n)["relative_norm"][d]) for d in DOMAINS},
        "cosine_mean": over(lambda n: vec(n)["off_diagonal_cosine"]["mean"]),
        "cosine_range": [min(vec(n)["off_diagonal_cosine"]["min"] for n in runs), max(vec(n)["off_diagonal_cosine"]["max"] for n in runs)],
        "cosine_range_per_kind": {k: [min(vec(n)["cosine_range_per_kind"][k][0] for n in runs), max(vec(n)["cosine_range_per_kind"][k][1] for n in runs)] for k in kinds},
        "share_per_kind": {k: {"parameters": vec(runs[0])["share_per_kind"][k]["parameters"], "norm_sq": over(lambda n, k=k: vec(n)["share_per_kind"][k]["norm_sq"])}
                           for k in kinds} if all("share_per_kind" in vec(n) for n in runs) else {},  # runs recorded before it lack it
        "linearity_cosine": {d: over(lambda n, d=d: vec(n)["linearity"][d]["mid"]["cosine_with_final"]) for d in DOMAINS
                             if all(vec(n)["linearity"][d]["mid"] for n in runs)},
        "own_gain": {d: over(lambda n, d=d: n["interference"]["own_gain"][d]) for d in DOMAINS},
        "cross_harm": {d: over(lambda n, d=d: n["interference"]["cross_harm"][d]) for d in DOMAINS},
        "weight_sum": over(lambda n: sum(n["best_weights"]["all"].values())),
        "weights": {d: over(lambda n, d=d: n["best_weights"]["all"][d]) for d in DOMAINS},
    }  # fmt: skip
    return {
        "seeds": seeds,
        "settings": {k: v for k, v in runs[0]["settings"].items() if k != "seed"},
        "base": runs[0].get("base", {}),
        "wall_seconds": sum(n["wall_seconds"] for n in runs),
        "labels": runs[0]["labels"],
        "test_mean_bits_per_byte": {c.name: over(lambda n, c=c: n["test_mean_bits_per_byte"][c.name]) for c in CANDIDATES},
        "test_bits_per_byte": {c.name: {d: over(lambda n, c=c, d=d: n["test_bits_per_byte"][c.name][d]) for d in DOMAINS} for c in CANDIDATES},
        "claims": claims,
        "regime": regime,
        "velocitune": {s: per_seed[s]["velocitune"] for s in seeds},
    }


def _ci_text(ci: dict, digits: int = 4, scale: float = 1.0) -> str:
    if ci["low"] is None:
        return f"{ci['mean'] * scale:.{digits}f}"
    return f"{ci['mean'] * scale:.{digits}f} [{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"


def _interval_chart(rows: list[tuple], xlabel: str, path: Path, row_height: float, zero_line: bool = False) -> None:
    """One row per ``(label, interval, color, marks)``: the 95% interval as a bar, then each mark
    ``(xs, matplotlib style)`` on that row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, row_height * len(rows) + 1.2))
    for row, (_, ci, color, marks) in enumerate(rows):
        if ci["low"] is not None:
            ax.plot([ci["low"], ci["high"]], [row, row], color=color, lw=3, alpha=0.6)
        for xs, style in marks:
            ax.plot(xs, [row] * len(xs), linestyle="none", **style)
    if zero_line:
        ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_claims(agg: dict, path: Path) -> None:
    """Each difference claim: the per-seed values and the 95% interval, against 0."""
    rows = []
    for key in (k for k, _, _, threshold in CLAIMS if threshold == 0.0):
        c = agg["claims"][key]
        color = {"reproduced": "C2", "not reproduced": "C3"}.get(c["verdict"], "C7")
        marks = [(list(c["per_seed"].values()), {"marker": "o", "color": color, "ms": 4}), ([c["mean"]], {"marker": "|", "color": "black", "ms": 12})]
        rows.append((c["claim"], c, color, marks))
    _interval_chart(rows, "test bits/byte difference (> 0: the claim holds); bar: 95% interval", path, 0.55, zero_line=True)


def plot_leaderboard(agg: dict, path: Path) -> None:
    mean = agg["test_mean_bits_per_byte"]
    rows = [(agg["labels"][name], mean[name], "C0", [([mean[name]["mean"]], {"marker": "o", "color": "C3" if name == "optimer" else "C0"})])
            for name in sorted(mean, key=lambda c: mean[c]["mean"])]  # fmt: skip
    _interval_chart(rows, "test mean bits/byte (lower is better); bar: 95% interval", path, 0.4)


def render(agg: dict) -> str:
    s, seeds, claims, regime = agg["settings"], agg["seeds"], agg["claims"], agg["regime"]
    mean = agg["test_mean_bits_per_byte"]
    base = agg["base"]
    out: list[str] = []
    add = out.append
    add(f"# OptiMer demo over {len(seeds)} seeds\n")
    add(
        f"Seeds {', '.join(map(str, seeds))}; each repeats the per-domain CPT ({s['cpt_tokens']:,} tokens per domain at "
        f"lr {s['lr']:g}), the vectors, the OptiMer searches ({s['trials']} {s['optimizer'].upper()} trials on dev, "
        f"{s['reopt_trials']} per re-optimisation), the three data-mixture runs ({len(DOMAINS) * s['cpt_tokens']:,} tokens) "
        f"and the test scores, over the same shipped base"
        + (f" ({base['parameters']:,} parameters pre-trained on {base['tokens']:,} tokens, {base['tokens_per_parameter']} "
           "per parameter)" if base else "")
        + f". Wall time {agg['wall_seconds'] / 60:.1f} min. Intervals are 95% Student-t intervals over seeds; a claim is "
        "*reproduced* when its whole interval is on the claim's side of the threshold, *not reproduced* when it is on the "
        "other side, else *inconclusive*. Every choice of the demo was made on dev splits; these are test scores.\n"
    )
    add("## Verdicts\n")
    add("| claim | measure (per seed) | mean [95% interval] | threshold | verdict |")
    add("|---|---|---:|---:|---|")
    for key, *_ in CLAIMS:
        c = claims[key]
        digits = 1 if c["threshold"] else 4
        per = ", ".join(f"{v:.{digits}f}" for v in c["per_seed"].values())
        add(f"| {c['claim']} | {c['measure']}: {per} | {_ci_text(c, digits)} | {c['threshold']:g} | **{c['verdict']}** |")
    add("\n![claims](plots/claims.png)\n")

    add("## Leaderboard on test (mean bits/byte over seeds, lower is better)\n")
    add("| rank | candidate | " + " | ".join(DOMAINS) + " | mean [95% interval] |")
    add("|---:|---|" + "---:|" * (len(DOMAINS) + 1))
    per = agg["test_bits_per_byte"]
    for rank, name in enumerate(sorted(mean, key=lambda c: mean[c]["mean"]), start=1):
        label = f"**{agg['labels'][name]}**" if name == "optimer" else agg["labels"][name]
        add(f"| {rank} | {label} (`{name}`) | " + " | ".join(f"{per[name][d]['mean']:.4f}" for d in DOMAINS) + f" | {_ci_text(mean[name])} |")
    add("\n![leaderboard](plots/leaderboard.png)\n")

    add("## Regime\n")
    rel = regime["relative_norm"]
    add("| measure | this miniature (mean over seeds [95% interval]) | the paper |")
    add("|---|---|---|")
    if base:
        add(f"| base pre-training | {base['tokens']:,} tokens, {base['tokens_per_parameter']} per parameter; epochs: "
            + ", ".join(f"{k} {v}" for k, v in base["epochs_per_source"].items()) + " | Gemma 3 27B, about 500 tokens per parameter |")
    add(f"| CPT tokens per domain / base tokens | {s['cpt_tokens'] / base['tokens']:.4f} | 1B / 14T = 0.00007 |" if base else "")
    add("| ‖v‖ / ‖θ_base‖ | " + ", ".join(f"{d} {_ci_text(rel[d], 3)}" for d in DOMAINS) + " | small (not reported) |")
    lo, hi = regime["cosine_range"]
    add(f"| pairwise cosine of the vectors | {lo:+.2f} to {hi:+.2f} (mean {_ci_text(regime['cosine_mean'], 3)}) | +0.03 to +0.31 |")
    shares = regime["share_per_kind"]
    for kind, (klo, khi) in regime["cosine_range_per_kind"].items():
        share = shares.get(kind)
        add(f"| cosine, {kind} tensors | {klo:+.2f} to {khi:+.2f}"
            + (f" ({share['parameters']:.0%} of the parameters, {_ci_text(share['norm_sq'], 0, scale=100)}% of ‖v‖²)" if share else "")
            + (" | about 5% of Gemma 3 27B's parameters |" if kind == "embeddings" else " | |"))
    if regime["linearity_cosine"]:
        add("| cosine(mid-run vector, final vector) | " + ", ".join(f"{d} {_ci_text(v, 3)}" for d, v in regime["linearity_cosine"].items())
            + " | roughly linear trajectories |")
    add("| single-domain CPT: own domain's test bits/byte gain | " + ", ".join(f"{d} {_ci_text(regime['own_gain'][d], 3)}" for d in DOMAINS) + " | |")
    add("| single-domain CPT: other domains' test bits/byte loss (forgetting) | "
        + ", ".join(f"{d} {_ci_text(regime['cross_harm'][d], 3)}" for d in DOMAINS) + " | small at 1B tokens on 27B |")
    add("| sum of OptiMer's weights (all domains) | " + _ci_text(regime["weight_sum"], 2) + " | |")
    add("")
    add(explain(agg) + "\n")

    add("## Velocitune\n")
    add("| seed | weight updates | all velocities 0 from step | final weights |")
    add("|---:|---:|---:|---|")
    for seed, v in agg["velocitune"].items():
        frozen = v["frozen_from_step"]
        add(f"| {seed} | {v['updates']} | {frozen if frozen is not None else 'never'} | "
            + ", ".join(f"{d} {v['final_weights'][d]:.3f}" for d in DOMAINS) + " |")
    add(f"\n![Velocitune weights, seed {seeds[0]}](plots/velocitune-seed-{seeds[0]}.png)\n")
    add(f"![linearity, seed {seeds[0]}](plots/linearity-seed-{seeds[0]}.png)\n")
    return "\n".join(line for line in out if line is not None)


def explain(agg: dict) -> str:
    """The data-mixing verdict in the light of the regime numbers."""
    c, regime = agg["claims"]["beats_data_mixing"], agg["regime"]
    rel = regime["relative_norm"]
    rel_text = ", ".join(f"{d} {rel[d]['mean']:.3f}" for d in DOMAINS)
    lo, hi = regime["cosine_range"]
    wsum = regime["weight_sum"]["mean"]
    gain = sum(regime["own_gain"][d]["mean"] for d in DOMAINS) / len(DOMAINS)
    harm = sum(regime["cross_harm"][d]["mean"] for d in DOMAINS) / len(DOMAINS)
    text = (
        f"**Why data mixing {'loses' if c['verdict'] == 'reproduced' else 'wins' if c['verdict'] == 'not reproduced' else 'ties'}.** "
        f"OptiMer's merge scores {-c['mean']:+.4f} bits/byte against the uniform mixture on average ({c['verdict']}; "
        "negative is better for OptiMer). "
        f"Each CPT run moves the base by ||v||/||θ|| = {rel_text}, and the vectors' pairwise cosines lie between "
        f"{lo:+.2f} and {hi:+.2f}.{_where_vectors_sit(regime)} A single-domain CPT gains {gain:.3f} bits/byte on its own domain and loses "
        f"{harm:.3f} on each other domain on average" + (f" ({harm / gain:.0%} of its gain)" if gain > 0 else "") + ": adding a vector brings that "
        "forgetting into the merge, while a mixture run trains every domain at once. The search's weights sum to "
        f"{wsum:.2f} on average: "
    )
    if wsum < len(DOMAINS) * 0.6:
        text += (
            f"well below adding every vector at full strength ({len(DOMAINS)}): the search scales the vectors down to limit "
            "that interference, and so gives up part of each domain's gain. "
        )
    else:
        text += "close to adding each vector at full strength, so the vectors add up with little interference. "
    base = agg["base"]
    text += (
        "The paper's CPT is far smaller relative to its base's pre-training (1B tokens per dataset on a 27B model "
        "pre-trained on 14T tokens: 0.007%"
        + (f"; here {agg['settings']['cpt_tokens'] / base['tokens']:.1%} of the base's {base['tokens']:,} tokens" if base else "")
        + "), where each CPT forgets less and the vectors are closer to additive; the smaller the forgetting relative to the "
        "gain, and the closer the cosines to the paper's +0.03 to +0.31, the closer the miniature is to the paper's conditions."
    )
    return text


def _where_vectors_sit(regime: dict) -> str:
    """Which kind of tensor holds most of the vectors' length, and the cosines there and elsewhere."""
    shares = regime["share_per_kind"]
    if not shares:
        return ""
    top = max(shares, key=lambda k: shares[k]["norm_sq"]["mean"])
    lo, hi = regime["cosine_range_per_kind"][top]
    rest = [k for k in regime["cosine_range_per_kind"] if k != top]
    return (
        f" {shares[top]['norm_sq']['mean']:.0%} of each vector's squared length sits in the {top} tensors "
        f"({shares[top]['parameters']:.0%} of the parameters"
        + ("; about 5% in Gemma 3 27B" if top == "embeddings" else "")
        + f"), where the cosines run from {lo:+.2f} to {hi:+.2f}"
        + (" (each domain moves the rows of its own tokens)" if top == "embeddings" else "")
        + ("; elsewhere: " + ", ".join(f"{k} {regime['cosine_range_per_kind'][k][0]:+.2f} to {regime['cosine_range_per_kind'][k][1]:+.2f}" for k in rest)
           if rest else "")
        + "."
    )


def check_layout(run_dir: Path, seeds: int) -> None:
    """A folder holds either one seed's run or a multi-seed run; refuse to mix them."""
    if seeds > 1 and (run_dir / SETTINGS_RECORD).exists():
        raise ConfigError(f"--run-dir {run_dir} holds a one-seed demo; choose another --run-dir for --seeds {seeds}")
    if seeds == 1 and (run_dir / SEEDS_RECORD).exists():
        raise ConfigError(f"--run-dir {run_dir} holds a multi-seed demo; rerun it with its --seeds or choose another --run-dir")


def run_seeds(run_dir: Path, settings: DemoSettings, seeds: int, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo for ``seeds`` seeds from ``settings.seed`` on (the folder locked and
    its settings checked like any run folder); returns the aggregate."""
    from optimer_merge.demo.report import write_report

    from optimer_merge.io.run_folder import RunFolder

    check_layout(run_dir, seeds)
    identity = {k: v for k, v in settings.identity().items() if k != "seed"}
    per_seed = {}
    with RunFolder(run_dir, "multi-seed demo", fix="choose another --run-dir or delete this one") as folder:
        folder.check(SEEDS_RECORD, identity)
        folder.record(SEEDS_RECORD, identity, seeds=list(range(settings.seed, settings.seed + seeds)))
        folder.keep()
        log(f"OptiMer demo, {seeds} seeds from {settings.seed}, into {run_dir}/seed-<s>/ ({settings.workers} workers)")
        ran = []  # wall seconds of the seeds that did work in this invocation (the ETA's pace)
        with job_pool(settings.workers) as pool:
            for i, seed in enumerate(range(settings.seed, settings.seed + seeds), start=1):
                seed_dir = run_dir / f"seed-{seed}"
                eta = f", ETA for the seeds left {duration(statistics.mean(ran) * (seeds - i + 1))}" if ran else ""
                log(f"== seed {seed} ({i}/{seeds}) into {seed_dir}{eta}")
                seed_settings = settings.model_copy(update={"seed": seed})
                start = time.perf_counter()
                per_seed[seed] = write_report(seed_dir, seed_settings, run_demo(seed_dir, seed_settings, log=log, pool=pool))
                if time.perf_counter() - start > 30:  # not a seed finished earlier, only reported again
                    ran.append(time.perf_counter() - start)
    return write_seeds_report(run_dir, per_seed)


def write_seeds_report(run_dir: Path, per_seed: dict[int, dict]) -> dict:
    """report.md, summary.json and plots/ of a multi-seed run; returns the aggregate."""
    from optimer_merge.io.files import atomic_write_text, write_json

    agg = aggregate(per_seed)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_claims(agg, plots / "claims.png")
    plot_leaderboard(agg, plots / "leaderboard.png")
    first = agg["seeds"][0]
    for name in ("velocitune", "linearity"):
        source = run_dir / f"seed-{first}" / "plots" / f"{name}.png"
        if source.exists():
            shutil.copyfile(source, plots / f"{name}-seed-{first}.png")
    write_json(run_dir / "summary.json", agg)
    atomic_write_text(run_dir / "report.md", render(agg))
    return agg


def copy_report(run_dir: Path, report_dir: Path) -> None:
    """The multi-seed report with its plots, into ``report_dir`` (replacing what was there)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "summary.json"):
        shutil.copyfile(run_dir / name, report_dir / name)
    shutil.rmtree(report_dir / "plots", ignore_errors=True)
    shutil.copytree(run_dir / "plots", report_dir / "plots")
