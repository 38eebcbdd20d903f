"""codebook: k-means error bounds, packed indices decoded in the graph, sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort
from quant_models import mlp, rel_error, to_ir

from onnxpress.passes.codebook import CodebookConfig, CodebookPass, kmeans_1d, pack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kmeans_error_bounds(rng, bits):
    values = rng.standard_normal(5000) * rng.uniform(0.1, 3)
    book, idx = kmeans_1d(values, 2**bits, iterations=25)
    decoded = book[idx].astype(np.float64)
    # every value is at its nearest centroid: within half the widest gap between centroids,
    # or beyond the outermost one by at most its distance to the extreme value
    bound = max(np.diff(book).max() / 2, book[0] - values.min(), values.max() - book[-1])
    assert np.abs(decoded - values).max() <= bound + 1e-6
    nearest = np.abs(values[:, None] - book[None, :].astype(np.float64)).min(axis=1)
    np.testing.assert_allclose(np.abs(decoded - values), nearest, atol=1e-6)
    # never worse than uniform quantization with as many levels (Lloyd starts from it)
    grid = np.linspace(values.min(), values.max(), 2**bits)
    uniform = grid[np.abs(values[:, None] - grid[None, :]).argmin(axis=1)]
    assert np.mean((decoded - values) ** 2) <= np.mean((uniform - values) ** 2) + 1e-9


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_is_dense(rng, bits):
    codes = rng.integers(0, 2**bits, size=101).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.size == -(-101 * bits // 8)
    per = 8 // bits
    unpacked = ((packed[:, None].astype(np.int32) >> (np.arange(per) * bits)) & (2**bits - 1)).ravel()[:101]
    np.testing.assert_array_equal(unpacked, codes)


@pytest.mark.parametrize(("bits", "rows"), [(2, 0), (3, 0), (4, 0), (4, 8), (8, 16)])
def test_decoded_in_graph_matches_the_codebook(rng, bits, rows):
    proto = mlp(rng)
    model = to_ir(proto)
    step = CodebookPass(CodebookConfig(bits=bits, rows_per_codebook=rows, min_elements=0, op_types=("MatMul",)))
    assert step(model).modified
    onnx.checker.check_model(ir.to_proto(model))
    assert step.details["tensors"] == 2 and "W1" not in model.graph.initializers
    expected = sum(
        (n // (rows or n)) * 2**bits * 4 + (-(-n * m * bits // 8) if 8 % bits == 0 else n * m)
        for n, m in ((64, 48), (48, 16))
    )
    assert step.details["bytes_after"] == expected < step.details["bytes_before"]
    books = [v for k, v in model.graph.initializers.items() if k.endswith("_codebook")]
    assert all(b.shape[-1] == 2**bits for b in books)
    if rows:
        assert books[0].shape[0] == 64 // rows
    x = rng.standard_normal((5, 64)).astype(np.float32)
    (ref,), (got,) = run_ort(proto, {"x": x}), run_ort(model, {"x": x})
    assert rel_error(ref, got) < {2: 0.8, 3: 0.45, 4: 0.25, 8: 0.02}[bits]


def test_exclusions_honoured(rng):
    model = to_ir(mlp(rng))
    step = CodebookPass(CodebookConfig(min_elements=0, exclude_nodes=("fc1",)))
    step(model)
    assert "W1" in model.graph.initializers and "W2" not in model.graph.initializers


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_are_checked(bits):
    with pytest.raises(ValueError, match="bits"):
        CodebookConfig(bits=bits)
