"""prune-magnitude: unstructured weight sparsity, post-training, by magnitude or by activation-scaled magnitude.

Each weight of a ``Conv``, ``Gemm`` or ``MatMul`` (see :mod:`onnxpress.passes.pruning_common`)
gets a score, and the lowest-scored weights are set to zero:

- ``score: magnitude``: ``s_ij = |W_ij|``;
- ``score: activation`` (Wanda, Sun et al. 2023): ``s_ij = |W_ij| * ||X_j||_2``, where
  ``||X_j||`` is the L2 norm of input channel ``j`` over every calibration element (every
  batch row, token and pixel). A small weight that reads a loud channel is kept; a large one
  that reads a silent channel goes. It needs calibration batches and no gradient.

How many weights each tensor loses:

- ``sparsity`` is the fraction of zeros to reach over all prunable weights (biases, 1-D
  tensors and tensors under ``min_elements`` are never touched);
- ``scope: global`` zeroes the lowest scores across all prunable tensors together (so
  tensors end at different sparsities), ``scope: per-layer`` gives every tensor the same
  fraction;
- ``per_layer: ["PATTERN=FRACTION", ...]`` pins the tensors whose weight or node name matches
  a glob to a fraction (e.g. to keep the first and last layer denser); the other tensors
  share what is left of the target, so the total stays ``sparsity``;
- ``granularity: row`` applies a tensor's fraction to each output channel (row) separately,
  Wanda's choice for transformers;
- ``pattern: "N:M"`` (e.g. ``2:4``) keeps the ``N`` best of every ``M`` consecutive weights
  along the input-channel axis, the layout sparse tensor cores run; it fixes the sparsity at
  ``1 - N/M``.

Exactly ``round(fraction * size)`` weights are zeroed per tensor (per row with ``row``),
ties broken by position, so the reached sparsity is exact; the report lists it per tensor.
With ``bias_correction`` the per-channel output means of the pruned layers are restored from
calibration data (:func:`onnxpress.passes.pruning_common.correct_output_means`). Zeros alone
do not make a model smaller or faster: follow with a packing or sparse-storage step.

The selection is written with numpy (``argpartition``): neither onnxruntime nor onnx ships a
pruner for ONNX graphs, and the ones in PyTorch work on ``nn.Module`` parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.pruning_common import (
    WEIGHT_OPS,
    BiasTarget,
    IncrementalReader,
    WeightLayer,
    bias_value,
    channel_stats,
    correct_output_means,
    cross_grams,
    find_weight_layers,
    input_grams,
    matches,
    parse_ratios,
    ratio_for,
    set_constant,
    take_batches,
    weight_from_matrix,
    weight_matrix,
)
from onnxpress.passes.registry import register

from onnxpress.graphs import constant_value

logger = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.5


@dataclass(frozen=True)
class PruneMagnitudeConfig:
    """Options of prune-magnitude."""

    sparsity: float | None = option(
        None,
        "Fraction of the prunable weights to set to zero, in [0, 1); 0.5 when unset "
        "(or 1 - N/M with a pattern).",
    )
    scope: Literal["global", "per-layer"] = option(
        "global",
        "global: one score threshold across all prunable tensors; per-layer: the same fraction in each tensor.",
    )
    per_layer: tuple[str, ...] = option(
        (),
        "PATTERN=FRACTION entries pinning the tensors whose weight or node name matches the glob; "
        "the other tensors share the rest of the target.",
    )
    score: Literal["magnitude", "activation", "sparsegpt"] = option(
        "magnitude",
        "magnitude: |W|; activation: |W| * ||X|| per input channel from calibration data (Wanda); "
        "sparsegpt: choose and compensate with the inverse input Hessian from calibration data (SparseGPT).",
    )
    granularity: Literal["tensor", "row"] = option(
        "tensor", "Rank weights within the whole tensor, or within each output channel (row)."
    )
    pattern: str | None = option(None, "N:M semi-structured sparsity, e.g. '2:4' (keep N of every M).")
    min_elements: int = option(1024, "Tensors with fewer elements than this are left dense.")
    ops: tuple[str, ...] = option(WEIGHT_OPS, "Op types whose constant weights are pruned.")
    exclude: tuple[str, ...] = option((), "Globs on weight or node names that are never pruned.")
    bias_correction: bool = option(
        False, "Restore each pruned layer's per-channel output mean from calibration data."
    )
    calibration_batches: int = option(16, "Most calibration batches read for scores and bias correction.")
    damping: float = option(0.01, "sparsegpt: damping added to the Hessian's diagonal, relative to its mean.")
    block_size: int = option(128, "sparsegpt: input columns pruned and compensated together.")
    sequential: bool = option(
        False,
        "sparsegpt: refit each layer to its original output from the inputs the model pruned so far "
        "gives it (two more runs per layer input).",
    )
    refit_kept: bool = option(
        False,
        "sparsegpt: after the mask is chosen, solve each row's kept weights exactly (least squares on the "
        "calibration Hessian) instead of keeping SparseGPT's one-pass updates.",
    )
    refit_bias: bool = option(
        False,
        "sparsegpt with sequential: fit each layer's bias together with its kept weights "
        "(least squares on [X~, 1]); a MatMul without a constant bias Add gets one.",
    )

    def __post_init__(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        parse_ratios(self.per_layer, "per_layer")
        unknown = sorted(set(self.ops) - set(WEIGHT_OPS))
        if unknown:
            raise ValueError(f"ops: {unknown} cannot be pruned; choose from {list(WEIGHT_OPS)}")
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.damping <= 0 or self.block_size < 1:
            raise ValueError(f"damping must be > 0 and block_size >= 1, got {self.damping} and {self.block_size}")
        if self.pattern is not None:
            n, m = self.pattern_nm
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} conflicts with pattern {self.pattern} (which means "
                    f"{1 - n / m:g}); give one of them"
                )
            if self.per_layer:
                raise ValueError("pattern N:M fixes the sparsity of every tensor: per_layer does not apply")
        if self.refit_kept and self.score != "sparsegpt":
            raise ValueError("refit_kept refits the weights SparseGPT keeps: it needs score=sparsegpt")
        if self.refit_bias and not (self.score == "sparsegpt" and self.sequential):
            raise ValueError("refit_bias refits biases in the sequential SparseGPT solve: it needs score=sparsegpt and sequential=true")
        if self.scope == "global" and self.granularity == "row":
            raise ValueError("granularity=row ranks within each output row, which needs scope=per-layer")

    @property
    def pattern_nm(self) -> tuple[int, int]:
        """``(N, M)`` of the pattern option."""
        assert self.pattern is not None
        n_text, sep, m_text = self.pattern.partition(":")
        try:
            n, m = int(n_text), int(m_text)
        except ValueError:
            n, m = -1, -1
        if not sep or not 0 < n < m:
            raise ValueError(f"pattern must read N:M with 0 < N < M (e.g. '2:4'), got {self.pattern!r}")
        return n, m

    @property
    def target(self) -> float:
        """The sparsity to reach over the prunable weights."""
        if self.pattern is not None:
            n, m = self.pattern_nm
            return 1 - n / m
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity


def _expand_norm(layer: WeightLayer, shape: tuple[int, ...], norm: np.ndarray) -> np.ndarray | None:
    """The per-input-channel norm broadcast to the weight's shape; None when it does not fit."""
    if layer.node.op_type == "Conv":
        out, per_group = shape[0], shape[1]
        groups = layer.groups
        if norm.shape[0] != groups * per_group or out % groups:
            return None
        rows = np.repeat(norm.reshape(groups, per_group), out // groups, axis=0)
        return rows.reshape(out, per_group, *([1] * (len(shape) - 2)))
    if norm.shape[0] != shape[layer.in_axis]:
        return None
    view = [1, 1]
    view[layer.in_axis] = norm.shape[0]
    return norm.reshape(view)


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` lowest scores (stable: equal scores go by position)."""
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    flat = scores.reshape(-1)
    if count >= flat.size:
        return np.arange(flat.size)
    return np.argsort(flat, kind="stable")[:count]


def _scale_ones(pruned_gram: np.ndarray, dense_cross: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Grams of ``[X, c]`` from those of ``[X, 1]``, with ``c`` the inputs' root mean square.

    The damping is relative to the mean of the Hessian's diagonal; a column of ones beside
    inputs of RMS 10 would be damped a hundred times harder than they are, which pulls the
    bias to zero. Scaling the column to the inputs' RMS, ``c = sqrt(mean(diag(X~^T X~)) / n)``,
    damps it like the others; the bias is then ``c`` times the weight of that column.
    """
    rows = pruned_gram[-1, -1]
    scale = float(np.sqrt(np.mean(np.diag(pruned_gram)[:-1]) / rows)) if rows > 0 else 1.0
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    factors = np.ones(len(pruned_gram))
    factors[-1] = scale
    outer = np.outer(factors, factors)
    return pruned_gram * outer, dense_cross * outer, scale


def _refit_kept(hessian: np.ndarray, rhs: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """The least-squares optimum of each row's kept weights for a fixed mask.

    SparseGPT updates a column's weights only while it prunes the columns before it, so the
    weights it keeps are close to, not at, the optimum for the final mask. Per row ``r`` with
    kept columns ``K``, ``w_K = H[K, K]^-1 rhs[r, K]``, where ``w H = rhs`` are the normal
    equations of the dense fit (``H`` damped as in the pruning). Cost: one solve of the kept
    size per row.
    """
    weight = np.zeros_like(rhs)
    for row in range(len(rhs)):
        kept = np.flatnonzero(~pruned[row])
        if kept.size:
            weight[row, kept] = np.linalg.solve(hessian[np.ix_(kept, kept)], rhs[row, kept])
    return weight


def _rows_view(layer: WeightLayer, array: np.ndarray) -> np.ndarray:
    """The array with output channels first and everything else flattened: ``[out, -1]``."""
    return np.moveaxis(array, layer.out_axis, 0).reshape(array.shape[layer.out_axis], -1)


def _nm_view(layer: WeightLayer, array: np.ndarray) -> np.ndarray:
    """The array with input channels on the last axis, where N:M groups run."""
    if layer.node.op_type == "Conv":
        return np.moveaxis(array, 1, -1)
    return np.moveaxis(array, layer.in_axis, -1)


def _unview_nm(layer: WeightLayer, array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nm_view`."""
    if layer.node.op_type == "Conv":
        return np.moveaxis(array, -1, 1)
    return np.moveaxis(array, -1, layer.in_axis)


@register
class PruneMagnitudePass(OnnxpressPass):
    """Set the lowest-scored weights of Conv, Gemm and MatMul to zero (unstructured or N:M sparsity)."""

    name = "prune-magnitude"
    Config = PruneMagnitudeConfig
    needs = Needs(
        calibration_when="score is activation or sparsegpt, or bias_correction is on",
        calibration_if=lambda c: c.score != "magnitude" or c.bias_correction,
    )

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        cfg = self.config
        if cfg.pattern is not None:
            cfg.pattern_nm  # noqa: B018 - raises on a malformed pattern

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        target = cfg.target
        layers: list[WeightLayer] = []
        skipped: dict[str, str] = {}
        dense_elements = 0
        for layer in find_weight_layers(model, cfg.ops):
            size = int(np.prod(layer.weight.const_value.shape))  # type: ignore[union-attr]
            if matches(cfg.exclude, layer.name, layer.node.name):
                skipped[layer.name] = "excluded by the exclude option"
            elif size < cfg.min_elements:
                skipped[layer.name] = f"{size} elements < min_elements {cfg.min_elements}"
            else:
                layers.append(layer)
                continue
            dense_elements += size
        self.details = {"target_sparsity": target, "tensors": {}, "skipped": skipped}
        if not layers:
            message = (
                f"no prunable weight: no {'/'.join(cfg.ops)} with a constant floating-point weight of at "
                f"least {cfg.min_elements} elements; the model is left as it is"
            )
            self.details["message"] = message
            logger.info("prune-magnitude: %s", message)
            return ir.passes.PassResult(model, modified=False)

        reference = ir.to_proto(model).SerializeToString() if cfg.bias_correction else b""
        batches = []
        if cfg.score != "magnitude" or cfg.bias_correction:
            batches = take_batches(self.calibration, model, cfg.calibration_batches)
        scores = self._scores(model, layers, batches)
        counts = self._allocate(layers, scores, target)
        sequential = cfg.score == "sparsegpt" and cfg.sequential
        # A layer that loses nothing needs no Hessian (sensitivity analysis prunes one layer at a
        # time); the sequential solve still refits it to the original outputs.
        to_solve = [layer for layer in layers if counts[layer.name] or cfg.pattern is not None]
        grams = input_grams(model, to_solve, batches) if cfg.score == "sparsegpt" and not sequential else {}
        crosses: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        original = ir.to_proto(model).SerializeToString() if sequential else b""
        readers = (IncrementalReader(batches), IncrementalReader(batches)) if sequential else None

        pruned: list[BiasTarget] = []
        total = zeros = refit_biases = 0
        for i, (layer, score) in enumerate(zip(layers, scores, strict=True)):
            self._report(i, len(layers), layer.name)
            array = layer.array()
            before = int(np.count_nonzero(array == 0))
            new = None
            target_map = None
            bias: ir.Value | None = None
            ones_scale = 1.0
            if sequential and layer.graph is model.graph and (layer.node.op_type != "Conv" or layer.groups == 1):
                if id(layer.node) not in crosses:
                    readers_of_input = [
                        other for other in layers[i:] if other.data is layer.data and other.node.op_type == layer.node.op_type
                    ]
                    crosses.update(
                        cross_grams(original, model, readers_of_input, readers, ones=cfg.refit_bias)
                    )
                if id(layer.node) in crosses:
                    pruned_gram, dense_cross, _ = crosses[id(layer.node)]
                    if cfg.refit_bias:
                        bias, reason = bias_value(layer, array.shape[layer.out_axis], array.dtype)
                        if bias is None:
                            logger.info("prune-magnitude: the bias of %s is not refit: %s", layer.describe(), reason)
                            pruned_gram, dense_cross = pruned_gram[:-1, :-1], dense_cross[:-1, :-1]
                        else:
                            pruned_gram, dense_cross, ones_scale = _scale_ones(pruned_gram, dense_cross)
                    grams[id(layer.node)] = (pruned_gram, 0)
                    target_map = self._target_map(pruned_gram, dense_cross)
            if id(layer.node) in grams:
                old_bias = None
                if bias is not None:
                    old_bias = constant_value(bias).numpy().astype(np.float64) / ones_scale  # type: ignore[union-attr]
                solved = self._sparsegpt(layer, array, grams[id(layer.node)][0], counts[layer.name], target_map, old_bias)
                if solved is not None:
                    new, new_bias = solved
                    if bias is not None and new_bias is not None:
                        set_constant(bias, (new_bias * ones_scale).astype(array.dtype))
                        refit_biases += 1
            if new is None:
                mask = self._mask(layer, score, counts[layer.name])
                new = np.where(mask, np.zeros((), array.dtype), array)
            else:
                self._score_used[layer.name] = "sparsegpt"
            after = int(np.count_nonzero(new == 0))
            if after != before:
                set_constant(layer.weight, new)
                pruned.append(BiasTarget(layer))
            total += array.size
            zeros += after
            self.details["tensors"][layer.name] = {
                "op": layer.node.op_type,
                "shape": list(array.shape),
                "elements": int(array.size),
                "sparsity_before": round(before / array.size, 6),
                "sparsity": round(after / array.size, 6),
                "score": self._score_used.get(layer.name, "magnitude"),
            }
        if cfg.bias_correction and pruned:
            self.details["bias_correction"] = correct_output_means(reference, model, pruned, batches)
        self.details["sparsity"] = round(zeros / total, 6)
        self.details["sparsity_all_weights"] = round(zeros / (total + dense_elements), 6)
        self.details["pruned_tensors"] = len(pruned)
        if cfg.refit_bias:
            self.details["refit_biases"] = refit_biases
        logger.info(
            "prune-magnitude: %d of %d tensors pruned, sparsity %.4f over %d prunable weights "
            "(%.4f over all %d weights; %d tensors left dense)",
            len(pruned), len(layers), zeros / total, total,
            zeros / (total + dense_elements), total + dense_elements, len(skipped),
        )
        return ir.passes.PassResult(model, modified=bool(pruned))

    def _scores(
        self, model: ir.Model, layers: list[WeightLayer], batches: list[dict[str, np.ndarray]]
    ) -> list[np.ndarray]:
        self._score_used: dict[str, str] = {}
        norms: dict[str, np.ndarray] = {}
        if self.config.score != "magnitude":
            requests = {
                layer.data.name: layer.data_axis
                for layer in layers
                if layer.graph is model.graph and layer.data.name
            }
            stats = channel_stats(model, requests, batches)
            norms = {name: s.norm.astype(np.float32) for name, s in stats.items()}
        scores = []
        for layer in layers:
            array = layer.array()
            score = np.abs(array.astype(np.float32))
            norm = norms.get(layer.data.name or "")
            expanded = _expand_norm(layer, array.shape, norm) if norm is not None else None
            if expanded is not None:
                score = score * expanded
                self._score_used[layer.name] = "activation"
            elif self.config.score != "magnitude":
                logger.warning("prune-magnitude: no activation norm for %s; ranking it by magnitude", layer.describe())
            scores.append(score)
        return scores

    def _allocate(self, layers: list[WeightLayer], scores: list[np.ndarray], target: float) -> dict[str, int]:
        """How many weights each tensor loses (a count per tensor; per row for row granularity)."""
        cfg = self.config
        ratios = parse_ratios(cfg.per_layer, "per_layer")
        sizes = {layer.name: score.size for layer, score in zip(layers, scores, strict=True)}
        total = sum(sizes.values())
        counts: dict[str, int] = {}
        free: list[int] = []
        for i, layer in enumerate(layers):
            pinned = ratio_for([layer.name, layer.node.name], ratios)
            if pinned is None or cfg.pattern is not None:
                free.append(i)
            else:
                counts[layer.name] = round(pinned * sizes[layer.name])
        if cfg.pattern is not None:
            return {layer.name: 0 for layer in layers}
        free_total = sum(sizes[layers[i].name] for i in free)
        wanted = round(target * total) - sum(counts.values())
        if free and not 0 <= wanted <= free_total:
            clamped = min(max(wanted, 0), free_total)
            logger.warning(
                "prune-magnitude: the per_layer fractions leave %d zeros for the other %d weights; using %d",
                wanted, free_total, clamped,
            )
            wanted = clamped
        if not free:
            return counts
        if cfg.scope == "global":
            flat = np.concatenate([scores[i].reshape(-1) for i in free])
            chosen = _lowest(flat, wanted)
            owner = np.repeat(np.arange(len(free)), [scores[i].size for i in free])
            per = np.bincount(owner[chosen], minlength=len(free))
            for j, i in enumerate(free):
                counts[layers[i].name] = int(per[j])
        else:
            fraction = wanted / free_total if free_total else 0.0
            for i in free:
                counts[layers[i].name] = round(fraction * sizes[layers[i].name])
        return counts

    def _target_map(self, pruned_gram: np.ndarray, dense_cross: np.ndarray) -> np.ndarray:
        """``M = (X^T X~)(X~^T X~ + damping)^-1``: ``W M`` maps the pruned input to the original output."""
        damped = pruned_gram.copy()
        damped[np.diag_indices(len(damped))] += self.config.damping * max(float(np.mean(np.diag(damped))), 1e-12)
        return np.linalg.solve(damped, dense_cross.T).T

    def _sparsegpt(
        self,
        layer: WeightLayer,
        array: np.ndarray,
        gram: np.ndarray,
        count: int,
        target_map: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Prunes one tensor with SparseGPT (Frantar & Alistarh, 2023); None when it cannot.

        With ``W`` as ``[out, in]`` and ``H = X^T X + damping * mean(diag H) * I``, the columns
        are visited in blocks; in each block the weights with the lowest ``w^2 / [H^-1]_jj^2``
        (the loss increase of removing them, optimal brain surgeon) are zeroed, and as each
        column is fixed the error it leaves is spread over the columns after it,
        ``W[:, j:] -= (w_j - q_j) / [U]_jj * U[j, j:]`` with ``U`` the upper Cholesky factor
        of ``H^-1``. Same selection under N:M (per group of M columns) and per-row granularity.

        With a ``bias`` (``refit_bias``), ``W`` becomes ``[W, b]`` and ``gram`` and ``target_map``
        are those of ``[X~, 1]``: the bias is a last column that is never pruned, so it takes
        the error of every column before it, and the fit is
        ``min ||[X, 1] [W, b]^T - [X~, 1] [W', b']^T||^2``.

        Returns:
            The pruned weight in the tensor's shape and the new bias (None without one).
        """
        cfg = self.config
        if layer.node.op_type == "Conv" and cfg.pattern is not None:
            return None
        weight = weight_matrix(layer, array.astype(np.float64)).T.copy()
        prunable = weight.shape[1]
        if bias is not None:
            weight = np.concatenate([weight, bias.reshape(-1, 1)], axis=1)
        cols = weight.shape[1]
        if gram.shape != (cols, cols):
            return None
        if target_map is not None:  # min ||W X - W' X~||: prune W M against X~ instead
            weight = weight @ target_map
        hessian = gram.copy()
        dead = np.diag(hessian) == 0
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
        hessian[np.diag_indices(cols)] += cfg.damping * float(np.mean(np.diag(hessian)))
        try:
            upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
        except np.linalg.LinAlgError:
            logger.warning("prune-magnitude: the Hessian of %s is not positive definite; ranking by magnitude", layer.describe())
            return None
        fraction = count / array.size
        n, m = cfg.pattern_nm if cfg.pattern is not None else (0, 0)
        rhs = weight @ hessian if cfg.refit_kept else None  # the dense fit's normal equations: w H = rhs
        pruned_mask = np.zeros(weight.shape, dtype=bool)
        for start in range(0, cols, cfg.block_size):
            stop = min(start + cfg.block_size, cols)
            block = weight[:, start:stop].copy()
            errors = np.zeros_like(block)
            diag = np.diag(upper)[start:stop]
            mask = np.zeros(block.shape, dtype=bool)
            width = max(min(stop, prunable) - start, 0)  # the bias column is never pruned
            if not m and width:
                loss = np.square(block[:, :width]) / np.square(diag[:width])[None, :]
                if cfg.granularity == "row":
                    k = round(fraction * width)
                    np.put_along_axis(mask[:, :width], np.argsort(loss, axis=1, kind="stable")[:, :k], True, axis=1)
                else:
                    chosen = np.zeros(loss.shape, dtype=bool)
                    chosen.reshape(-1)[_lowest(loss, round(fraction * loss.size))] = True
                    mask[:, :width] = chosen
            for j in range(stop - start):
                if m and j % m == 0 and j < width:
                    group = np.square(block[:, j : j + m]) / np.square(diag[j : j + m])[None, :]
                    chosen = np.argsort(group, axis=1, kind="stable")[:, : m - n]
                    sub = np.zeros(group.shape, dtype=bool)
                    np.put_along_axis(sub, chosen, True, axis=1)
                    mask[:, j : j + m] = sub
                column = block[:, j]
                kept = np.where(mask[:, j], 0.0, column)
                error = (column - kept) / diag[j]
                block[:, j:] -= np.outer(error, upper[start + j, start + j : stop])
                block[:, j] = kept
                errors[:, j] = error
            weight[:, start:stop] = block
            pruned_mask[:, start:stop] = mask
            weight[:, stop:] -= errors @ upper[start:stop, stop:]
        if rhs is not None:
            weight = _refit_kept(hessian, rhs, pruned_mask)
        new_bias = weight[:, prunable] if bias is not None else None
        return weight_from_matrix(layer, weight[:, :prunable].T, array.shape).astype(array.dtype), new_bias

    def _mask(self, layer: WeightLayer, score: np.ndarray, count: int) -> np.ndarray:
        """A boolean mask of the weights to zero."""
        cfg = self.config
        if cfg.pattern is not None:
            n, m = cfg.pattern_nm
            view = _nm_view(layer, score)
            if view.shape[-1] % m:
                logger.warning(
                    "prune-magnitude: %s has %d input channels, not a multiple of %d; left dense",
                    layer.describe(), view.shape[-1], m,
                )
                return np.zeros(score.shape, dtype=bool)
            groups = view.reshape(-1, m)
            order = np.argsort(groups, axis=1, kind="stable")[:, : m - n]
            mask_groups = np.zeros(groups.shape, dtype=bool)
            np.put_along_axis(mask_groups, order, True, axis=1)
            return _unview_nm(layer, mask_groups.reshape(view.shape))
        if cfg.granularity == "row":
            rows = _rows_view(layer, score)
            per_row = round(count / score.size * rows.shape[1]) if score.size else 0
            order = np.argsort(rows, axis=1, kind="stable")[:, :per_row]
            mask_rows = np.zeros(rows.shape, dtype=bool)
            np.put_along_axis(mask_rows, order, True, axis=1)
            moved_shape = (score.shape[layer.out_axis],) + tuple(
                d for a, d in enumerate(score.shape) if a != layer.out_axis
            )
            return np.moveaxis(mask_rows.reshape(moved_shape), 0, layer.out_axis)
        mask = np.zeros(score.size, dtype=bool)
        mask[_lowest(score, count)] = True
        return mask.reshape(score.shape)
