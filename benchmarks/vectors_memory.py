"""Peak memory of `vectors extract` and `vectors stats` on a large tensor, this checkout against
``--baseline`` (a git revision that read whole tensors).

The checkpoints hold the embedding of Gemma 3 270M (262144 x 640 values, 320 MiB in bf16; a 27B
model's is 1.4 G values, 2.7 GiB) and two MLP matrices; four "CPT" models are the base plus seeded
noise of 2% of its values. Each command runs as a subprocess while its process tree's memory is
sampled: the peak proportional set size (PSS, which counts the memory-mapped checkpoint pages it
has read, page cache the kernel can drop) and the peak anonymous memory (what the process itself
holds), the latter also as a multiple of the embedding's bf16 size. Goal: anonymous memory that
does not grow with the largest tensor (a few pieces of it).

    python benchmarks/vectors_memory.py                 # this checkout and the baseline
    python benchmarks/vectors_memory.py --baseline ""   # this checkout only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import REPO, PeakSampler, worktree

K = 4
EMBED = (262144, 640)


def build(root: Path) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(EMBED, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2048, EMBED[1], generator=generator),
        "model.layers.0.mlp.down_proj.weight": torch.randn(EMBED[1], 2048, generator=generator),
    }
    folders = []
    for i in range(K + 1):
        folder = root / ("base" if i == 0 else f"cpt-{i}")
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            noise = torch.Generator().manual_seed(i)
            out = {n: (t + (0.02 * t.std() * torch.randn(t.shape, generator=noise) if i else 0)).to(torch.bfloat16) for n, t in tensors.items()}
            save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1:]


def measure(code: Path, argv: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "optimer_merge.cli", *argv], cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT)
        start = time.perf_counter()
        with PeakSampler(process.pid, interval=0.05) as sampler:
            code_ = process.wait(timeout=1800)
    if code_ != 0:
        raise RuntimeError(f"{argv[:2]} failed ({code_}); see {log}")
    return {"peak_pss_mib": round(sampler.tree_pss / 2**20), "peak_anon_mib": round(sampler.tree_anon / 2**20), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="31d978e", help="git revision that read whole tensors ('' to skip)")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vectors-memory-"))
    base, models = build(root)
    embed_mib = EMBED[0] * EMBED[1] * 2 / 2**20
    versions = {"this checkout": REPO}
    results = {}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            versions[f"baseline {args.baseline}"] = stack.enter_context(worktree(args.baseline, root))
        for label, code in versions.items():
            out = root / f"vectors-{label.split()[-1]}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            extract = ["vectors", "extract", "--base", str(base), "--out", str(out)] + [f"--model=v{i}={m}" for i, m in enumerate(models)]
            stats = ["vectors", "stats", str(out)]
            results[label] = {"extract": measure(code, extract, root / f"extract-{label.split()[-1]}.log"),
                              "stats": measure(code, stats, root / f"stats-{label.split()[-1]}.log")}  # fmt: skip
            for step, r in results[label].items():
                r["anon_embeddings"] = round(r["peak_anon_mib"] / embed_mib, 2)
                print(f"{label:>22s}  {step:8s} peak PSS {r['peak_pss_mib']:6d} MiB, anonymous {r['peak_anon_mib']:6d} MiB "
                      f"= {r['anon_embeddings']:5.2f} x the bf16 embedding, {r['seconds']:6.1f} s", flush=True)  # fmt: skip
    print(json.dumps({"embedding_mib": embed_mib, "models": K, "results": results}, indent=2))


if __name__ == "__main__":
    main()
