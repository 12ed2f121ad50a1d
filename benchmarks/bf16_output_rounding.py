"""How much of a small CPT delta survives a bf16 checkpoint: |bf16(base+delta) - (base+delta)| / |delta|.

Run: .venv/bin/python benchmarks/bf16_output_rounding.py
"""

import torch


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 4096, generator=gen) * 0.02
    print("delta/weight  mean |rounding error| / mean |delta|  (bf16 output; fp32 output)")
    for ratio in (0.001, 0.01, 0.1):
        delta = torch.randn(base.shape, generator=gen) * base.abs().mean() * ratio / 0.8
        exact = base.double() + delta.double()
        for dtype in (torch.bfloat16, torch.float32):
            err = (exact - (base + delta).to(dtype).double()).abs().mean() / delta.abs().double().mean()
            print(f"{ratio:>10.3f}  {str(dtype):>15}  {err.item():.4f}")


if __name__ == "__main__":
    main()
