"""Small models for the quantization tests: ONNX text for the graph, numpy for the weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir


def with_weights(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Parses a model and adds ``weights`` as initializers, then checks it."""
    model = onnx.parser.parse_model(text)
    for name, array in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(model)
    return model


def mlp(rng: np.random.Generator, opset: int = 17) -> onnx.ModelProto:
    """x[N,64] -> MatMul W1[64,48] (+b) -> Relu -> MatMul W2[48,16]: nodes 'fc1', 'act', 'fc2'."""
    text = f"""
    <ir_version: 8, opset_import: ["": {opset}]>
    mlp (float[N, 64] x) => (float[N, 16] y) {{
        h = MatMul (x, W1)
        hb = Add (h, b1)
        a = Relu (hb)
        y = MatMul (a, W2)
    }}
    """
    model = with_weights(text, {
        "W1": rng.standard_normal((64, 48)).astype(np.float32) * 0.2,
        "b1": rng.standard_normal(48).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((48, 16)).astype(np.float32) * 0.2,
    })
    for node, name in zip(model.graph.node, ("fc1", "bias1", "act", "fc2"), strict=True):
        node.name = name
    return model


def embed_mlp(rng: np.random.Generator, opset: int = 17) -> onnx.ModelProto:
    """ids[N,5] -> Gather table[100,64] ('embed') -> MatMul W[64,32] ('proj') -> y[N,5,32]."""
    text = f"""
    <ir_version: 8, opset_import: ["": {opset}]>
    emb (int64[N, 5] ids) => (float[N, 5, 32] y) {{
        e = Gather <axis = 0> (table, ids)
        y = MatMul (e, W)
    }}
    """
    model = with_weights(text, {
        "table": rng.standard_normal((100, 64)).astype(np.float32),
        "W": rng.standard_normal((64, 32)).astype(np.float32) * 0.1,
    })
    model.graph.node[0].name = "embed"
    model.graph.node[1].name = "proj"
    return model


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def rel_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """``||r - c|| / ||r||``."""
    return float(np.linalg.norm(reference - candidate) / np.linalg.norm(reference))


def initializer(model: ir.Model, suffix: str) -> np.ndarray:
    """The one initializer whose name ends with ``suffix``."""
    found = [v for name, v in model.graph.initializers.items() if name.endswith(suffix)]
    assert len(found) == 1, f"expected one initializer ending in {suffix!r}, got {[v.name for v in found]}"
    return found[0].const_value.numpy()
