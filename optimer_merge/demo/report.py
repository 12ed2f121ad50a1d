"""report.md of a demo run: test leaderboard, plots, cost table and a verdict on each paper claim.

``numbers`` computes every figure and verdict from the jobs' states and the cost accounting (no
files: testable on synthetic inputs), ``render`` turns them into Markdown, and ``write_report``
reads the run folder and writes report.md, summary.json, the leaderboard and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from optimer_merge.demo.costs import cost_accounting
from optimer_merge.demo.pipeline import CANDIDATES, DOMAINS, OBJECTIVES, DemoSettings, write_best
from optimer_merge.report.plots import pyplot, save


def plot_velocitune(trajectory: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    steps = [t["step"] for t in trajectory]
    for i, d in enumerate(DOMAINS):
        ax.plot(steps, [t["weights"][d] for t in trajectory], marker="o", ms=3, color=f"C{i}", label=d)
    ax.set_xlabel("training step")
    ax.set_ylabel("sampling weight")
    ax.set_title("Velocitune: domain weights during the mixture run")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_linearity(linearity: dict[str, dict], path: Path) -> None:
    """Each domain's dev loss along theta_base + t v, and its CPT run's own mid-run checkpoint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, d in enumerate(DOMAINS):
        line = linearity[d]["line"]
        ts = sorted(line, key=float)
        ax.plot([float(t) for t in ts], [line[t][d] for t in ts], marker="o", ms=3, color=f"C{i}", label=f"{d}: base + t v")
        mid = linearity[d]["mid"]
        if mid:
            ax.plot([mid["t"]], [mid["loss"][d]], marker="x", ms=9, mew=2, color=f"C{i}", linestyle="none")
    ax.set_xlabel("t (x: the run's own mid-run checkpoint, at its projection onto v)")
    ax.set_ylabel("dev loss (own domain)")
    ax.set_title("linearity of each CPT run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_reoptimization(weights: dict[str, dict[str, float]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(weights)
    for i, (objective, w) in enumerate(weights.items()):
        ax.bar([j + i * width for j in range(len(DOMAINS))], [w[d] for d in DOMAINS], width, label=f"dev: {objective}", color=f"C{i}")
    ax.set_xticks([j + width * (len(weights) - 1) / 2 for j in range(len(DOMAINS))], DOMAINS)
    ax.set_ylabel("merge weight w_i")
    ax.set_title("best weights per objective, same vector pool")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f} %"


def _listing(values: dict[str, float]) -> str:
    return ", ".join(f"{d} {values[d]:.2f}" for d in DOMAINS)


def _against_range(ratio: float) -> str:
    return "within the paper's range" if 15 <= ratio <= 35 else ("above the paper's range" if ratio > 35 else "below the paper's range")


def _verdict(ok: bool) -> str:
    return "**Reproduced.**" if ok else "**Not reproduced.**"


def numbers(settings: DemoSettings, states: dict, costs: dict, invocations: list[dict]) -> dict:
    """Every figure and verdict of the report, from the jobs' states and the cost accounting."""
    r = lambda job: states[job]["result"]  # noqa: E731
    test = {c.name: r(f"test-{c.name}") for c in CANDIDATES}
    mean = {name: t["mean_bits_per_byte"] for name, t in test.items()}
    searches = {name: r(f"search-{name}") for name in OBJECTIVES}
    vt = r("mix-velocitune")
    frozen = next((u["step"] for u in vt["trajectory"][1:] if all(v == 0 for v in u["velocity"].values())), None)
    cmp_all = costs["comparison"]["all"]
    ratio_total, ratio_search = cmp_all["ratio_with_training"], cmp_all["ratio_search_only"]
    ja = {name: t["bits_per_byte"]["ja"] for name, t in test.items()}
    mc = {name: (t["bits_per_byte"]["math"] + t["bits_per_byte"]["code"]) / 2 for name, t in test.items()}
    o, u, a, mo = mean["optimer"], mean["mix-uniform"], mean["average"], mean["mix-optimer"]
    bpb = {name: t["bits_per_byte"] for name, t in test.items()}
    own_gain = {d: bpb["base"][d] - bpb[f"cpt-{d}"][d] for d in DOMAINS}
    cross_harm = {d: sum(bpb[f"cpt-{d}"][e] - bpb["base"][e] for e in DOMAINS if e != d) / (len(DOMAINS) - 1) for d in DOMAINS}
    claims = {
        "beats_data_mixing": o < u,
        "beats_model_averaging": o < a,
        "search_cost_15x_or_more": {"search_only": ratio_search >= 15, "with_training": ratio_total >= 15},
        "ratios_improve_mixture": mo < u,
        "reoptimization_without_retraining": ja["optimer-ja"] < ja["optimer"] and mc["optimer-math-code"] < mc["optimer"],
    }
    return {
        "settings": settings.model_dump(),
        "base": {k: r("base")[k] for k in ("parameters", "tokens", "tokens_per_parameter", "epochs_per_source")},
        "wall_seconds": sum(i["seconds"] for i in invocations),
        "invocations": len(invocations),
        "labels": {c.name: c.label for c in CANDIDATES},
        "test_bits_per_byte": {name: t["bits_per_byte"] for name, t in test.items()},
        "test_mean_bits_per_byte": mean,
        "test_ja": ja,
        "test_math_code": mc,
        "searches": {
            name: {"trials": s["trials"], "best": s["best"], "uniform_average": s["uniform_average"]} for name, s in searches.items()
        },
        "best_weights": {name: s["best"]["weights"] for name, s in searches.items()},
        "mixture_ratios": searches["all"]["best"]["mixture_ratios"],
        "vectors": r("vectors"),
        # what each single-domain CPT does on test: its own domain's gain, the other domains' mean loss
        "interference": {"own_gain": own_gain, "cross_harm": cross_harm},
        "velocitune": {
            "updates": len(vt["trajectory"]) - 1,
            "final_weights": vt["trajectory"][-1]["weights"],
            "tokens_per_dataset": vt["tokens_per_dataset"],
            "frozen_from_step": frozen,
        },
        "costs": costs,
        "cost_ratio_with_training": ratio_total,
        "cost_ratio_search_only": ratio_search,
        "claims": claims,
    }


def render(n: dict) -> str:
    """report.md from ``numbers``."""
    s = DemoSettings(**n["settings"])
    mean, test, searches = n["test_mean_bits_per_byte"], n["test_bits_per_byte"], n["searches"]
    claims, costs = n["claims"], n["costs"]
    out = []
    add = out.append
    add("# OptiMer demo report\n")
    took = f"; wall time {n['wall_seconds'] / 60:.1f} min" + (f" over {n['invocations']} invocations (resumed)" if n["invocations"] > 1 else "")
    add(
        f"The shipped tiny Gemma 3 base ({n['base']['parameters']:,} parameters pre-trained on {n['base']['tokens']:,} tokens, "
        f"{n['base']['tokens_per_parameter']} per parameter), four per-domain CPT runs of "
        f"{s.cpt_tokens:,} tokens each ({', '.join(DOMAINS)}), an OptiMer search of {searches['all']['trials']} "
        f"{s.optimizer.upper()} trials on the dev objective (first {s.limit} items per task, top {s.finalists} re-scored on "
        f"{s.finalist_limit}), two re-optimisations of {s.reopt_trials} trials, and three data-mixture CPT baselines at the "
        f"same total budget ({len(DOMAINS) * s.cpt_tokens:,} tokens). Seed {s.seed}{took}.\n"
    )
    add(
        "Every candidate is scored on the **test** tasks, which no search saw: bits per byte on held-out text of each "
        f"domain (first {s.test_limit or 'all'} documents per task; lower is better). A model this small answers "
        "multiple-choice questions at chance, so the demo scores language modelling; on real models use "
        "`recipes/objectives/dev-all.yaml` and `test-all.yaml`.\n"
    )

    add("## Leaderboard on test\n")
    order = sorted(CANDIDATES, key=lambda c: mean[c.name])
    add("| rank | candidate | " + " | ".join(DOMAINS) + " | mean bits/byte ↓ | vs base |")
    add("|---:|---|" + "---:|" * (len(DOMAINS) + 2))
    best_per = {d: min(t[d] for t in test.values()) for d in DOMAINS}
    for rank, c in enumerate(order, start=1):
        cells = [f"**{test[c.name][d]:.4f}**" if test[c.name][d] == best_per[d] else f"{test[c.name][d]:.4f}" for d in DOMAINS]
        name = f"**{c.label}**" if c.name == "optimer" else c.label
        add(f"| {rank} | {name} (`{c.name}`) | " + " | ".join(cells) + f" | {mean[c.name]:.4f} | {_pct(mean[c.name], mean['base'])} |")
    add("\nThe same results as a stock leaderboard (from the lm-eval results files in `eval/`): "
        "[leaderboard.md](leaderboard.md), [leaderboard.csv](leaderboard.csv).\n")
    add("![test leaderboard](leaderboard.png)\n")

    add("## OptiMer searches\n")
    add("| objective (dev) | trials | best dev score | uniform averaging (trial 1) | " + " | ".join(f"w_{d}" for d in DOMAINS) + " |")
    add("|---|---:|---:|---:|" + "---:|" * len(DOMAINS))
    for name, srch in searches.items():
        best, uni = srch["best"], srch["uniform_average"]
        score = best["final_score"] if best["final_score"] is not None else best["score"]
        uni_text = f"{uni['score']:.4f}" if uni else "—"
        add(f"| {' + '.join(OBJECTIVES[name])} | {srch['trials']} | {score:.4f} | {uni_text} | " + " | ".join(f"{best['weights'][d]:.3f}" for d in DOMAINS) + " |")
    ratios = n["mixture_ratios"]
    add(
        "\nScores are −mean bits per byte on the dev tasks (higher is better); the best is taken among the finalists at "
        f"limit {s.finalist_limit}, uniform averaging at limit {s.limit}. The all-domain weights read as mixture ratios: "
        + ", ".join(f"{d} {ratios[d]:.3f}" for d in DOMAINS) + " (the ratios of `mix-optimer`). The winning recipe is "
        "[best.yaml](best.yaml), a stock mergekit recipe (`mergekit-yaml best.yaml OUT`).\n"
    )
    add("![search trace](search/all/trace.png)\n")
    add("![best weights and ratios](search/all/weights.png)\n")
    add("![weights per objective](plots/reoptimization.png)\n")

    vec = n["vectors"]
    off = vec["off_diagonal_cosine"]
    add("## Distribution vectors\n")
    add(
        "L2 norms: " + ", ".join(f"{d} {vec['l2_norm'][d]:.3f}" for d in DOMAINS)
        + f". Pairwise cosine similarity between {off['min']:.3f} and {off['max']:.3f} (mean {off['mean']:.3f}); "
        "[vectors/stats.json](vectors/stats.json) has them per layer.\n"
    )
    if "relative_norm" in vec:  # runs recorded before these measurements lack them
        add(
            "Regime (the paper: small updates, cosines between its vectors of +0.03 to +0.31): each CPT moved the "
            "weights by ||v|| / ||theta_base|| = " + ", ".join(f"{d} {vec['relative_norm'][d]:.3f}" for d in DOMAINS)
            + "; pairwise cosines per kind of tensor: "
            + ", ".join(f"{kind} {lo:+.2f} to {hi:+.2f}" for kind, (lo, hi) in vec["cosine_range_per_kind"].items()) + ".\n"
            + ("Share of the parameters and of ||v||² (mean over the domains) per kind of tensor: "
               + ", ".join(f"{kind} {e['parameters']:.0%} / {e['norm_sq']:.0%}" for kind, e in vec["share_per_kind"].items()) + ".\n"
               if "share_per_kind" in vec else "")
        )
    if "linearity" in vec:
        lin = vec["linearity"]
        add(
            "Linearity of each CPT run: cosine between its vector at the mid-run checkpoint and at the end "
            + ", ".join(f"{d} {lin[d]['mid']['cosine_with_final']:.3f}" for d in DOMAINS if lin[d]["mid"])
            + "; own-domain dev loss along theta_base + t v (t = " + ", ".join(sorted(lin[DOMAINS[0]]["line"], key=float)) + "):\n"
        )
        add("| domain | " + " | ".join(f"t={t}" for t in sorted(lin[DOMAINS[0]]["line"], key=float)) + " | mid-run checkpoint (t, loss) |")
        add("|---" * (len(lin[DOMAINS[0]]["line"]) + 2) + "|")
        for d in DOMAINS:
            line, mid = lin[d]["line"], lin[d]["mid"]
            cells = " | ".join(f"{line[t][d]:.3f}" for t in sorted(line, key=float))
            add(f"| {d} | {cells} | " + (f"{mid['t']:.2f}, {mid['loss'][d]:.3f}" if mid else "none kept") + " |")
        add("\n![linearity](plots/linearity.png)\n")
    inter = n["interference"]
    add(
        "Interference on test: each single-domain CPT lowers its own domain's bits/byte by " + _listing(inter["own_gain"])
        + " and raises the other domains' by " + _listing(inter["cross_harm"]) + " on average.\n"
    )
    add("![cosine heatmap](vectors/cosine.png)\n")

    vt = n["velocitune"]
    frozen = vt["frozen_from_step"]
    add("## Velocitune\n")
    add(
        f"Weights were updated {vt['updates']} times from uniform; the last update gave "
        + ", ".join(f"{d} {vt['final_weights'][d]:.3f}" for d in DOMAINS)
        + ". Tokens seen: " + ", ".join(f"{d} {vt['tokens_per_dataset'][d]:,}" for d in DOMAINS) + "."
        + (f" From step {frozen} every domain was at or below its fitted target loss (all velocities 0), so the weights "
           "stayed put: the scaling-law fit on the short proxy run predicts less progress than the full run makes." if frozen else "")
        + "\n"
    )
    add("![Velocitune trajectory](plots/velocitune.png)\n")

    add("## Cost\n")
    add("| stage | runs | tokens | compute seconds | job wall seconds | note |")
    add("|---|---:|---:|---:|---:|---|")
    for st in costs["stages"]:
        tokens = f"{st['tokens']:,}" if st["tokens"] else "—"
        add(f"| {st['stage']} | {st['runs']} | {tokens} | {st['wall_seconds']:.1f} | {st['job_seconds']:.1f} | {st['note']} |")
    cmp_all = costs["comparison"]["all"]
    add(
        f"\n**Search cost, {cmp_all['candidates']} candidates.** OptiMer: {cmp_all['optimer_search_seconds']:.1f}s of trials "
        f"and finalists. A data-mixture search over as many ratios: {cmp_all['mixture_search_seconds']:.0f}s "
        f"({cmp_all['mixture_measured_seconds']:.0f}s measured for the 2 static mixture runs trained here with their dev "
        f"evaluations, {cmp_all['mixture_extrapolated_seconds']:.0f}s extrapolated at {cmp_all['mixture_run_seconds']:.1f}s "
        f"per run + {cmp_all['dev_eval_seconds']:.1f}s per evaluation). Ratio **{cmp_all['ratio_search_only']:.1f}x** for the "
        f"search alone, **{cmp_all['ratio_with_training']:.1f}x** counting OptiMer's per-domain CPT "
        f"({cmp_all['optimer_training_seconds']:.1f}s).\n"
    )
    for name in OBJECTIVES:
        if name == "all":
            continue
        c = costs["comparison"][name]
        add(
            f"Re-optimising for {' + '.join(OBJECTIVES[name])}: {c['optimer_search_seconds']:.1f}s and no training, against "
            f"{c['mixture_search_seconds']:.0f}s for a new data-mixture search of {c['candidates']} candidates "
            f"({c['ratio_search_only']:.1f}x).\n"
        )
    add("Assumptions:\n")
    for a in costs["assumptions"]:
        add(f"- {a}")
    add("")

    add("## The paper's claims, checked on this run\n")
    o, u, a, v, mo = mean["optimer"], mean["mix-uniform"], mean["average"], mean["mix-velocitune"], mean["mix-optimer"]
    best_all = searches["all"]["best"]["weights"]
    add(
        f"**OptiMer beats data mixing.** {_verdict(claims['beats_data_mixing'])} On test, OptiMer's merge scores {o:.4f} bits/byte against "
        f"{u:.4f} for the uniform data-mixture CPT ({_pct(o, u)}) trained on the same total tokens; the Velocitune mixture "
        f"scores {v:.4f} ({'worse' if o < v else 'better'} than OptiMer). The base scores {mean['base']:.4f}."
        + (
            ""
            if claims["beats_data_mixing"]
            else f" The search settles on weights summing to {sum(best_all.values()):.2f}, not the "
            f"{len(DOMAINS)} of adding each vector at full strength: each single-domain CPT gains "
            + _listing(n["interference"]["own_gain"]) + " bits/byte on its own domain but costs the other domains "
            + _listing(n["interference"]["cross_harm"]) + " on average (forgetting), so a vector added at full strength "
            "brings that cost into every other domain and the search trades gains for it, while a mixture run learns all "
            "four domains along one trajectory and forgets little."
        )
        + "\n"
    )
    add(
        f"**OptiMer beats model averaging.** {_verdict(claims['beats_model_averaging'])} {o:.4f} against {a:.4f} for w_i = 1/K ({_pct(o, a)}). "
        f"The searched weights are {_listing(best_all)}.\n"
    )
    ratio_total, ratio_search = n["cost_ratio_with_training"], n["cost_ratio_search_only"]
    cost_claim = claims["search_cost_15x_or_more"]
    if cost_claim["search_only"] and cost_claim["with_training"]:
        verdict = _verdict(True)
    elif cost_claim["search_only"]:
        verdict = "**Reproduced for the search itself, not once OptiMer's training is counted.**"
    else:
        verdict = _verdict(False)
    add(
        f"**15-35x lower search cost.** {verdict} OptiMer's search over {cmp_all['candidates']} candidates costs "
        f"{ratio_search:.1f}x less than a data-mixture search over as many ratios ({_against_range(ratio_search)}); "
        f"counting its one-time per-domain CPT, {ratio_total:.1f}x ({_against_range(ratio_total)}). The ratio grows with "
        "the number of candidates and with the cost of a training run relative to an evaluation: at the paper's 100 "
        f"trials the same unit costs give {cmp_all['ratio_with_training_at_100_trials']:.1f}x with training. See the "
        "assumptions above.\n"
    )
    add(
        f"**OptiMer's weights, read as mixture ratios, improve data-mixture CPT.** {_verdict(claims['ratios_improve_mixture'])} Retraining with the "
        f"ratios {_listing(ratios)} scores {mo:.4f} against {u:.4f} for uniform ratios "
        f"({_pct(mo, u)}).\n"
    )
    ja, mc = n["test_ja"], n["test_math_code"]
    c_ja, c_mc = costs["comparison"]["ja"], costs["comparison"]["math-code"]
    add(
        f"**The same pool re-optimised for a new objective, no retraining.** {_verdict(claims['reoptimization_without_retraining'])} Searching for Japanese "
        f"alone gives {ja['optimer-ja']:.4f} bits/byte on the ja test against {ja['optimer']:.4f} for the all-domain merge "
        f"(CPT on ja only: {ja['cpt-ja']:.4f}); searching for math+code gives {mc['optimer-math-code']:.4f} on their tests "
        f"against {mc['optimer']:.4f} (CPT on math / code only: {mc['cpt-math']:.4f} / {mc['cpt-code']:.4f}). "
        f"These cost {c_ja['optimer_search_seconds']:.0f}s and {c_mc['optimer_search_seconds']:.0f}s of search and no training.\n"
    )
    add(
        "One run, one seed, small test sets: differences of a few thousandths of a bit per byte are within what another "
        "seed could change; `optimer-merge demo --seeds 3` gives each claim a 95% interval over seeds and a verdict from it. "
        "The paper's setting (27B model, 1B tokens per dataset, 100 trials) is far from this one.\n"
    )
    add("## Files\n")
    add(
        "`cpt/<domain>/` and `mixture/<kind>/` (train_meta.json, metrics.csv, model/), `vectors/`, `merges/average/`, "
        "`search/<objective>/` (trials.jsonl, recipes/, summary.json, best.yaml, best-model/), `eval/<candidate>/results.json`, "
        "`costs.json`, `logs/<job>.log`.\n"
    )
    return "\n".join(out)


def write_report(run: str | Path, settings: DemoSettings, states: dict) -> dict:
    """leaderboard.{md,csv,png}, costs.json, plots/, best.yaml, report.md and summary.json; returns the numbers."""
    from optimer_merge.io.files import atomic_write_text, write_json
    from optimer_merge.report import leaderboard as lb

    run = Path(run)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    rows = lb.read_rows([f"{c.name}={run / 'eval' / c.name / 'results.json'}" for c in CANDIDATES])
    lb.write(lb.leaderboard(rows, metrics=["bits_per_byte"]), run)
    costs = cost_accounting(run, states)
    write_json(run / "costs.json", costs)
    write_best(run, settings)
    invocations = json.loads((run / "invocations.json").read_text()) if (run / "invocations.json").exists() else []
    result = numbers(settings, states, costs, invocations)
    plot_reoptimization(result["best_weights"], plots / "reoptimization.png")
    plot_velocitune(states["mix-velocitune"]["result"]["trajectory"], plots / "velocitune.png")
    if "linearity" in states["vectors"]["result"]:
        plot_linearity(states["vectors"]["result"]["linearity"], plots / "linearity.png")
    atomic_write_text(run / "report.md", render(result))
    write_json(run / "summary.json", {k: v for k, v in result.items() if k != "costs"})
    return result
