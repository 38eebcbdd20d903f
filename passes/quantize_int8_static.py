r"""quantize-int8-static: QDQ int8 with activation ranges calibrated on real batches.

onnxruntime's quantizer does the work (``QDQQuantizer``, the calibrators of
``onnxruntime.quantization.calibrate``): it is the reference implementation of QDQ placement
for onnxruntime's kernels. Each activation ``x`` gets a range ``[a, b]`` from the calibration
batches and becomes ``DequantizeLinear(QuantizeLinear(x))`` with

.. math::

    s = (b - a) / 255, \quad z = \mathrm{round}(-a / s), \quad
    \hat x = (\mathrm{clip}(\mathrm{round}(x / s) + z, 0, 255) - z) \cdot s

(uint8 activations; weights are symmetric int8, per output channel by default). The range
comes from ``minmax`` (the extremes seen), ``percentile`` (the ``percentile``-th percentile of
``|x|``, which ignores rare outliers) or ``entropy`` (the clipping threshold that minimizes the
KL divergence between the float and the quantized histograms).

What this pass fixes around onnxruntime's entry point ``quantize_static``:

* Bounded memory. ``quantize_static`` hands the whole data reader to the calibrator, which
  keeps every intermediate tensor of every batch until the end (the histogram calibrators have
  no limit at all): a transformer's activations for a few hundred samples exhaust memory. Here
  the calibrator is fed one batch per ``collect_data`` call; the min/max calibrator merges
  ranges and the histogram calibrators merge histograms between calls, so memory stays at one
  batch of intermediates whatever the number of batches.
* Pre-processing. ``quant_pre_process`` runs symbolic shape inference, which fails on MiniLM;
  only onnx's shape inference runs here.
* Data checks. Every batch is checked against the model's inputs first, with an error naming
  the input (onnxruntime fails deep inside the calibration session).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxpress.passes.base import Needs, OnnxpressPass, ProgressCallback, option
from onnxpress.passes.quant_common import (
    NodeFilter,
    adopt,
    check_exclusions,
    load_for_adopt,
    opset_of,
    to_proto_file,
    wants_auto_exclude,
)
from onnxpress.passes.registry import register

from onnxpress.calibration import checked_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeInt8StaticConfig:
    """Options of quantize-int8-static."""

    method: Literal["minmax", "percentile", "entropy"] = option("minmax", "how activation ranges are calibrated")
    percentile: float = option(99.999, "with method percentile: the percentile of |x| kept in range")
    per_channel: bool = option(True, "one weight scale per output channel")
    reduce_range: bool = option(True, "7-bit weights: x86 CPUs without VNNI (AVX2) can saturate u8s8 sums otherwise")
    activation_type: Literal["uint8", "int8"] = option("uint8", "activation integer type")
    op_types: tuple[str, ...] = option((), "op types to quantize (empty: every type onnxruntime's QDQ quantizer knows)")
    exclude_nodes: tuple[str, ...] = option((), "node names or globs to keep in float")
    exclude_op_types: tuple[str, ...] = option((), "op types to keep in float")
    max_batches: int = option(0, "calibrate on at most this many batches (0: all)")
    auto_exclude: bool | None = option(
        False, "keep the most harmful nodes out of quantization until target_cosine is met (needs calibration data); null: only when calibration data is given"
    )
    target_cosine: float = option(0.995, "auto_exclude's goal: mean cosine of every float output")
    max_excluded: int = option(12, "auto_exclude keeps at most this many nodes in float")

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be within (50, 100], got {self.percentile}")
        if self.max_batches < 0 or self.max_excluded < 0:
            raise ValueError("max_batches and max_excluded must be >= 0")
        if not 0.0 < self.target_cosine <= 1.0:
            raise ValueError(f"target_cosine must be within (0, 1], got {self.target_cosine}")


class _OneBatch:
    """An onnxruntime CalibrationDataReader that yields a single batch."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        self._batch: dict[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return batch


def quantize_static_int8(
    model: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: QuantizeInt8StaticConfig,
    node_filter: NodeFilter,
    progress: ProgressCallback | None = None,
) -> tuple[ir.Model, int]:
    """A QDQ-quantized copy of ``model`` and the number of batches calibrated on."""
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.method]
    op_types = list(config.op_types) or sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    if guard_for_qdq(model, dry_run=True):
        model = model.clone()
    excluded = node_filter.excluded_names(model) + guard_for_qdq(model)
    # onnxruntime's calibrators print progress to stdout; library code must not.
    with tempfile.TemporaryDirectory(prefix="onnxpress-static-") as folder, contextlib.redirect_stdout(io.StringIO()):
        source = to_proto_file(model, folder)
        calib_options = {"percentile": config.percentile} if config.method == "percentile" else {}
        calibrator = create_calibrator(
            source, op_types, augmented_model_path=str(Path(folder) / "augmented.onnx"),
            calibrate_method=method, use_external_data_format=source.with_suffix(".onnx.data").exists(),
            providers=["CPUExecutionProvider"], extra_options=calib_options,
        )
        count = 0
        for batch in checked_batches(model, batches):
            calibrator.collect_data(_OneBatch(batch))  # one batch of intermediates at a time
            count += 1
            if progress is not None:
                progress(count, config.max_batches or 0, f"calibrated batch {count}")
            if config.max_batches and count >= config.max_batches:
                break
        ranges = calibrator.compute_data()
        del calibrator
        proto = load_model_with_shape_infer(source)
        activation = QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8
        per_channel = config.per_channel and opset_of(model) >= 13
        if config.per_channel and not per_channel:
            # DequantizeLinear takes an axis (per-channel scales) from opset 13 on; onnxruntime's
            # quantizer wrote one anyway and the model did not load.
            logger.warning("quantize-int8-static: opset %d < 13 has no per-channel DequantizeLinear; "
                           "weights get one scale per tensor", opset_of(model))
        quantizer = QDQQuantizer(
            proto, per_channel, config.reduce_range, QuantType.QInt8, activation, ranges,
            [], excluded, op_types, {"ActivationSymmetric": config.activation_type == "int8"},
        )
        quantizer.quantize_model()
        out = Path(folder) / "quantized.onnx"
        large = source.with_suffix(".onnx.data").exists()
        quantizer.model.save_model_to_file(str(out), large)
        return load_for_adopt(out), count


_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _bias_channels(node: ir.Node) -> int | None:
    """Output channels of a Gemm or Conv with a constant bias and weight, else None."""
    if node.op_type not in ("Gemm", "Conv") or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias, weight = node.inputs[2], node.inputs[1]
    if bias.const_value is None or weight is None or weight.const_value is None:
        return None
    shape = weight.const_value.shape
    transposed = "transB" in node.attributes and node.attributes["transB"].value
    return shape[0] if node.op_type == "Conv" or transposed else shape[-1]


def guard_for_qdq(model: ir.Model, *, dry_run: bool = False) -> list[str] | bool:
    """Prepares ``model`` for onnxruntime's ``QDQQuantizer``, which assumes plain float32 layers.

    Left to itself the quantizer (a) gives float16 weights a float16 ``DequantizeLinear``
    scale, which needs opset 19 (the model does not load); (b) quantizes an initializer read
    by several nodes once, with one node's per-channel axis, and reuses it for the others (a
    ``Gather`` of a table that a ``MatMul`` also reads then fails at run time in
    ``QuantizeLinear``); (c) fails (``IndexError``, "truth value of an array") on a ``Gemm``
    bias that is not one value per output channel (``[1]``, ``[1, N]``, ``[M, N]``). Here nodes
    with float16/bfloat16/float64 inputs, and Gemms with an ``[M, N]`` bias, are named (unnamed
    ones get a name) and returned for ``nodes_to_exclude``; every extra reader of a shared
    float32 initializer gets its own copy; a ``[1]`` or ``[1, N]`` bias becomes ``[N]`` (the
    same sums). (d) It quantizes a Gemm's bias as if ``beta`` were 1 (``beta = 0.5`` gave 59 %
    error), so ``beta`` is folded into the bias: ``C' = beta * C``, ``beta' = 1``.

    Args:
        model: Changed in place unless ``dry_run``.
        dry_run: Only answer whether anything would change.

    Returns:
        The names of the nodes to keep in float; with ``dry_run``, whether the model needs a change.
    """
    from onnxpress.graphs import graph_likes

    graphs = [g for g in graph_likes(model) if isinstance(g, ir.Graph)]
    names = {n.name for g in graphs for n in g if n.name} | {v.name for g in graphs for v in g.initializers.values()}
    keep: list[str] = []
    changed = False

    def unique(base: str) -> str:
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.add(name)
        return name

    def keep_float(node: ir.Node) -> None:
        if not node.name:
            node.name = unique(f"{node.op_type}_kept_float_by_onnxpress")
        keep.append(node.name)

    for graph in graphs:
        seen: set[int] = set()
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if any(v is not None and v.dtype in _FLOATS for v in [*node.inputs, *node.outputs]):
                if dry_run:
                    return True
                keep_float(node)
                continue
            for index, value in enumerate(node.inputs):
                if value is None or not value.is_initializer() or value.is_graph_input():
                    continue
                if value.dtype != ir.DataType.FLOAT or value.const_value is None:
                    continue
                if id(value) not in seen:
                    seen.add(id(value))
                    continue
                if dry_run:
                    return True
                owner = value.graph if isinstance(value.graph, ir.Graph) else graph
                name = unique(f"{value.name}_copy")
                copy = ir.Value(name=name, shape=value.shape, type=value.type,
                                const_value=ir.Tensor(value.const_value.numpy(), name=name))
                owner.register_initializer(copy)
                node.replace_input_with(index, copy)
                changed = True
            channels = _bias_channels(node)
            if channels is None:
                continue
            bias = node.inputs[2]
            if bias.const_value.size not in (1, channels):  # a [M, N] bias: not per channel
                if dry_run:
                    return True
                keep_float(node)
                continue
            beta = float(node.attributes["beta"].value) if node.op_type == "Gemm" and "beta" in node.attributes else 1.0
            if bias.const_value.shape != ir.Shape([channels]) or beta != 1.0:
                if dry_run:
                    return True
                flat = bias.const_value.numpy().reshape(-1) * np.float32(beta)
                value = np.broadcast_to(flat, (channels,)).astype(np.float32)
                if beta != 1.0:
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                name = unique(f"{bias.name}_per_channel")
                wide = ir.Value(name=name, shape=ir.Shape([channels]), type=bias.type,
                                const_value=ir.Tensor(value, name=name))
                graph.register_initializer(wide)
                node.replace_input_with(2, wide)
                changed = True
    return changed if dry_run else keep


@register
class QuantizeInt8StaticPass(OnnxpressPass):
    """QDQ int8 calibrated on real batches (minmax, percentile or entropy), in bounded memory."""

    name = "quantize-int8-static"
    Config = QuantizeInt8StaticConfig
    needs = Needs(calibration=True, min_opset=10)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config: QuantizeInt8StaticConfig = self.config
        node_filter = NodeFilter(config.exclude_nodes, config.exclude_op_types)
        check_exclusions(model, node_filter, self.name)
        auto: dict = {}
        if wants_auto_exclude(config.auto_exclude, self.calibration):
            from onnxpress.passes.auto_exclude import auto_exclude, calibration_sample

            node_filter, auto = auto_exclude(
                model, node_filter, calibration_sample(model, self.calibration, 4),
                lambda m, f: quantize_static_int8(m, self.calibration, config, f)[0],
                target_cosine=config.target_cosine, max_excluded=config.max_excluded,
                quantizable=lambda n: not n.op_type.endswith("QuantizeLinear"), progress=self._report,
            )
        kept = node_filter.excluded_names(model)
        quantized, count = quantize_static_int8(model, self.calibration, config, node_filter, self._report)
        adopt(model, quantized)
        qdq = sum(1 for n in model.graph if n.op_type == "QuantizeLinear")
        self.details = {
            "method": config.method, "batches": count, "quantize_linear_nodes": qdq,
            "kept_float": kept,
        } | ({"auto_exclude": auto} if auto else {})
        logger.info("quantize-int8-static: %d QuantizeLinear nodes, calibrated (%s) on %d batches",
                    qdq, config.method, count)
        return ir.passes.PassResult(model, modified=qdq > 0)
