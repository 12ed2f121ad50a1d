"""The merge rule itself, on plain tensors."""

import pytest
import torch

from optimer_merge.merge.rule import coefficients, merge_tensor


def test_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=gen)
    models = [base + 0.01 * torch.randn(5, 7, generator=gen) for _ in range(3)]
    weights = torch.tensor([0.5, -0.3, 1.2])
    out = merge_tensor(base, models, weights, scale=0.7)
    expected = base.double() + 0.7 * sum(
        w * (m.double() - base.double()) for w, m in zip(weights.double(), models)
    )
    assert out.dtype == torch.float32
    assert (out.double() - expected).abs().max() < 1e-6


def test_inputs_are_not_modified():
    base = torch.ones(4)
    model = torch.full((4,), 2.0)
    merge_tensor(base, [model], torch.tensor([0.5]))
    assert torch.equal(base, torch.ones(4)) and torch.equal(model, torch.full((4,), 2.0))


def test_bf16_inputs_give_fp32_and_float64_gives_float64():
    base = torch.randn(8, dtype=torch.bfloat16)
    assert merge_tensor(base, [base], torch.tensor([1.0])).dtype == torch.float32
    base64 = torch.randn(8, dtype=torch.float64)
    assert merge_tensor(base64, [base64], torch.tensor([1.0])).dtype == torch.float64


def test_batched_coefficients_and_normalize():
    weights = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    c = coefficients(weights, scale=2.0, normalize=True)
    assert torch.allclose(c, torch.tensor([[0.5, 1.5], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="sum is not 0"):
        coefficients(torch.tensor([1.0, -1.0]), normalize=True)


def test_resident_and_streamed_paths_match_the_formula_in_float64():
    """combine's two paths (resident rows in chunks, streamed models, batched coefficients) give
    base + sum_i c_i d_i within float32 rounding, for model rows (d_i = row - base) and vector rows
    (d_i = row) mixed, with chunks smaller than the tensor."""
    from optimer_merge.merge import rule

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 300, 7, generator=gen)
    rows = [base + 0.01 * torch.randn(2, 300, 7, generator=gen), 0.01 * torch.randn(2, 300, 7, generator=gen),
            (base + 0.02 * torch.randn(2, 300, 7, generator=gen)).bfloat16()]  # fmt: skip
    relative = [True, False, True]
    c = torch.tensor([0.6, -0.4, 1.1], dtype=torch.float64)

    def expected(b, rs, cs):
        return b.double() + sum(ci * (r.double() - b.double() if rel else r.double()) for ci, r, rel in zip(cs.tolist(), rs, relative))

    before = [t.clone() for t in (base, *rows)]
    chunk = rule.CHUNK["cpu"]
    rule.CHUNK["cpu"] = 1000  # several chunks and a partial last one
    try:
        resident = rule.combine(base, rows, c, relative=relative)
        into = torch.empty(7, 300, 2).permute(2, 1, 0)  # a non-contiguous target
        rule.combine(base, rows, c, relative=relative, out=into)
    finally:
        rule.CHUNK["cpu"] = chunk
    streamed = rule.combine(base, iter(rows), c, relative=relative)
    for out in (resident, into, streamed):
        assert (out.double() - expected(base, rows, c)).abs().max() < 1e-6
    batched = rule.combine(base, iter(rows), torch.stack([c, 2 * c]), relative=relative)
    for i, cs in enumerate((c, 2 * c)):
        assert (batched[i].double() - expected(base[i], [r[i] for r in rows], cs)).abs().max() < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, (base, *rows)))
