r"""cast-fp16: float16 weights and arithmetic, with sensitive ops kept in float32.

onnxruntime's converter (``onnxruntime.transformers.float16.convert_float_to_float16``) does
the rewrite: float32 initializers become float16 (values beyond the float16 range are clamped
to :math:`\pm 65504`, nonzero values below :math:`5.96 \times 10^{-8}` to that minimum) and a
``Cast`` is put wherever a float32 op meets a float16 one. The model's inputs and outputs keep
their float32 types, so callers feed and read the same arrays as before.

What this pass adds:

* Numerically sensitive ops stay in float32 (``keep_fp32_ops``): reductions, normalizations,
  ``Softmax``, ``Exp``/``Log``/``Pow``/``Sqrt``, whose float16 results overflow or lose the
  small differences they exist to compute.
* The result loads in onnxruntime. Converters emit float16 nodes that the CPU provider has no
  kernel for, so the model fails to load ("Could not find an implementation for ..."). After
  converting, the pass opens the model in onnxruntime; each op type it cannot place goes on
  the float32 list and the model is converted again, until it loads (at most ``max_retries``
  rounds). The op types added this way are in the pass details. onnxruntime is opened in a
  child process, because on some float16 graphs it crashes instead of raising; after a crash
  the op types are tried in float32 one at a time (most frequent first) until one lets it load.
* Control flow. The converter puts every ``Cast`` it adds around a float32 op into the main
  graph, also for an op inside an ``If``/``Loop``/``Scan`` body, where the Cast's input does not
  exist (the model does not load). :func:`move_casts_into_subgraphs` moves each such Cast into
  the body that defines its input, right after the input's producer. The converter also keys
  initializers by name across all graphs (it fails on a body initializer that shadows one of
  the same name elsewhere), so :func:`rename_shadowing_initializers` first gives each such
  body initializer a name of its own. onnxruntime, like onnx_ir, reads a shadowed name inside
  the body as the body's own initializer, and every use follows the renamed value, so the
  model computes the same.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxpress.graphs import nested_graphs
from onnxpress.passes.base import OnnxpressPass, option
from onnxpress.passes.quant_common import NodeFilter, adopt, check_exclusions, load_for_adopt, to_proto_file
from onnxpress.passes.registry import register

logger = logging.getLogger(__name__)

#: Ops whose float16 results are unreliable (range or precision), kept in float32 by default.
SENSITIVE_OPS = (
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Pow", "Sqrt", "Exp", "Log", "Erf",
    "CumSum", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "Resize", "Einsum",
)

_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")


@dataclass(frozen=True)
class CastFp16Config:
    """Options of cast-fp16."""

    keep_fp32_ops: tuple[str, ...] = option(SENSITIVE_OPS, "op types computed in float32 (casts at their boundaries)")
    exclude_nodes: tuple[str, ...] = option((), "node names or globs computed in float32")
    keep_io_types: bool = option(True, "model inputs and outputs stay float32")
    check_loads: bool = option(True, "open the result in onnxruntime and keep ops it cannot run in float32")
    max_retries: int = option(8, "rounds of check_loads before giving up")

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


#: What :func:`_loads` returns when onnxruntime kills the process instead of raising.
CRASHED = "onnxruntime crashed"

_LOAD_SCRIPT = (
    "import sys, onnxruntime as ort\n"
    "o = ort.SessionOptions(); o.log_severity_level = 4\n"
    "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
)


def _loads(path: Path) -> str | None:
    """None when onnxruntime can open the model, else its error message.

    The model is opened in a child process with onnxruntime's default (full) optimization:
    onnxruntime 1.32 crashes with a segmentation fault on some float16 graphs (a torch
    TensorEncoder whose attention begins with Transpose), which would otherwise end the
    caller's process without a word. A crash returns a message starting with :data:`CRASHED`.
    """
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        return "onnxruntime did not finish loading the float16 model in 600 s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"{CRASHED} (signal {-proc.returncode}) loading the float16 model"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines else f"exit status {proc.returncode}"


def rename_shadowing_initializers(model: ir.Model) -> int:
    """Renames each subgraph initializer whose name an earlier graph's initializer has; returns how many."""
    taken = {name for graph in (model.graph, *model.graph.subgraphs()) for name in graph.initializers}
    seen = set(model.graph.initializers)
    renamed = 0
    for graph in model.graph.subgraphs():
        for name in list(graph.initializers):
            if name in seen:
                suffix, new = 1, f"{name}__{graph.name or 'body'}"
                while new in taken:
                    suffix += 1
                    new = f"{name}__{graph.name or 'body'}_{suffix}"
                graph.initializers[name].name = new  # its uses refer to the value and follow it
                taken.add(new)
                name = new
                renamed += 1
            seen.add(name)
    return renamed


def move_casts_into_subgraphs(model: onnx.ModelProto) -> int:
    """Moves each main-graph ``Cast`` whose input is defined only inside a subgraph into it.

    The Cast goes right after the node that produces its input (first, when the input is the
    subgraph's input or initializer), so the subgraph stays in topological order; Casts of
    Casts are moved in turn. Returns how many were moved.
    """
    main = model.graph
    subgraphs = nested_graphs(main.node)
    if not subgraphs:
        return 0
    moved = 0
    while True:
        defined = {v.name for v in main.input} | {t.name for t in main.initializer}
        defined |= {o for n in main.node for o in n.output}
        owner: dict[str, onnx.GraphProto] = {}
        for sub in subgraphs:
            for name in [v.name for v in sub.input] + [t.name for t in sub.initializer] + [
                o for n in sub.node for o in n.output
            ]:
                owner.setdefault(name, sub)
        stray = [
            i for i, n in enumerate(main.node)
            if n.op_type == "Cast" and n.domain in ("", "ai.onnx") and len(n.input) == 1
            and n.input[0] not in defined and n.input[0] in owner
        ]
        if not stray:
            return moved
        index = stray[0]
        cast = onnx.NodeProto()
        cast.CopyFrom(main.node[index])
        del main.node[index]
        target = owner[cast.input[0]]
        position = next((k + 1 for k, n in enumerate(target.node) if cast.input[0] in n.output), 0)
        target.node.insert(position, cast)
        for k, info in enumerate(main.value_info):
            if info.name in cast.output:
                target.value_info.append(info)
                del main.value_info[k]
                break
        moved += 1


@register
class CastFp16Pass(OnnxpressPass):
    """Float16 weights and arithmetic; sensitive ops stay float32; the result loads in onnxruntime."""

    name = "cast-fp16"
    Config = CastFp16Config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        config: CastFp16Config = self.config
        node_filter = NodeFilter(config.exclude_nodes, ())
        check_exclusions(model, node_filter, self.name)
        blocked_nodes = node_filter.excluded_names(model)
        if renamed := rename_shadowing_initializers(model):
            logger.info("cast-fp16: renamed %d subgraph initializers named like another graph's", renamed)
        block_ops = list(config.keep_fp32_ops)
        added: list[str] = []
        with tempfile.TemporaryDirectory(prefix="onnxpress-fp16-") as folder:
            source = to_proto_file(model, folder)
            out = Path(folder) / "fp16.onnx"

            def convert(ops: list[str]) -> onnx.ModelProto:
                proto = onnx.load(str(source))
                with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxruntime.transformers.float16"):
                    converted = convert_float_to_float16(
                        proto, keep_io_types=config.keep_io_types, op_block_list=ops,
                        node_block_list=blocked_nodes, disable_shape_infer=False,
                    )
                moved = move_casts_into_subgraphs(converted)
                if moved:
                    logger.debug("cast-fp16: moved %d Casts into the subgraphs that define their inputs", moved)
                onnx.save(converted, str(out), save_as_external_data=converted.ByteSize() > (1 << 30))
                return converted

            for attempt in range(config.max_retries + 1):
                converted = convert(block_ops)
                if not config.check_loads:
                    break
                error = _loads(out)
                if error is None:
                    break
                if error.startswith(CRASHED) and attempt < config.max_retries:
                    op = _op_that_stops_the_crash(converted, block_ops, convert, out)
                    if op is not None:
                        logger.info("cast-fp16: onnxruntime crashes on float16 %s here; keeping it in float32", op)
                        block_ops.append(op)
                        added.append(op)
                        continue
                missing = _MISSING_KERNEL.search(error)
                if missing is None or missing.group(1) in block_ops or attempt == config.max_retries:
                    raise ValueError(f"the float16 model does not load in onnxruntime: {error.strip().splitlines()[0]}")
                op = missing.group(1)
                logger.info("cast-fp16: onnxruntime has no float16 kernel for %s; keeping it in float32", op)
                block_ops.append(op)
                added.append(op)
            converted_model = load_for_adopt(out)
        adopt(model, converted_model)
        fp16 = sum(1 for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16)
        casts = sum(1 for n in model.graph if n.op_type == "Cast")
        self.details = {"fp16_initializers": fp16, "casts": casts, "kept_fp32_for_onnxruntime": added}
        logger.info("cast-fp16: %d float16 initializers, %d casts, %d op types kept float32 for onnxruntime",
                    fp16, casts, len(added))
        return ir.passes.PassResult(model, modified=fp16 > 0 or casts > 0)


def _op_that_stops_the_crash(
    converted: onnx.ModelProto, block_ops: list[str], convert: Callable[[list[str]], object], out: Path
) -> str | None:
    """The first op type (most frequent first) whose float32 compute lets onnxruntime load the model.

    ``convert(ops)`` writes the conversion with ``ops`` kept float32 to ``out``. None when no
    single op type helps.
    """
    skip = set(block_ops) | {"Cast", "Constant", "Identity"}
    counts = Counter(n.op_type for n in converted.graph.node if n.domain in ("", "ai.onnx"))
    for op, _ in counts.most_common():
        if op in skip:
            continue
        convert([*block_ops, op])
        if _loads(out) is None:
            return op
    return None


@contextlib.contextmanager
def _quiet(name: str):
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)
