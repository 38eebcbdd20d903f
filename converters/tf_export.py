"""TensorFlow and Keras 3 to ONNX with tf2onnx, through ``tf2onnx.convert.from_function``.

Every source becomes one ``tf.function`` with an input signature, and that goes to
``tf2onnx.convert.from_function``:

* Keras models (Sequential, functional, subclassed) are wrapped as
  ``f(*inputs) = model(inputs, training=False)``. tf2onnx's own ``from_keras`` is not used:
  it reads Keras 2 attributes that Keras 3 Sequential models lack and fails on them.
* A ``tf.function`` is used as it is (its input signature, or one built from the input
  descriptions); a ``tf.Module`` through its ``__call__``; a SavedModel through a signature
  (``serving_default`` unless another is named), whose keyword arguments become the inputs.

onnxpress adds a handler for ``Erfc`` (Keras 3's exact GELU), which tf2onnx 1.17 lacks.
tf2onnx converts what it can and leaves unsupported TensorFlow ops in the graph
(``continue_on_error``); onnxpress then refuses the model, naming each such op and keeping
tf2onnx's messages. tf2onnx writes opsets up to 18; the default here is 17.

``.keras`` files load with ``safe_mode=True`` (no Python lambdas deserialized) and without
compiling. Like :mod:`~onnxpress.converters.torch_export`, every export is checked against the
framework at batch size 1 and a larger one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxpress.converters.fidelity import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZES,
    DEFAULT_RTOL,
)
from onnxpress.converters.result import (
    ConversionError,
    ConversionResult,
    captured_stdout,
    check_export,
    default_output_names,
    describe_value,
    first_lines,
    fix_output_shapes,
    model_opset,
    quiet_framework_logs,
)
from onnxpress.converters.specs import (
    DEFAULT_SEED,
    Dim,
    InputSpec,
    batches_from_data,
    check_batch_sizes,
    generate_inputs,
    load_callable,
    parse_inputs,
)

from onnxpress.errors import InputError, ValidationFailedError

logger = logging.getLogger(__name__)

#: Highest opset tf2onnx writes.
MAX_TF_OPSET = 18
#: Opset when none is asked for.
DEFAULT_TF_OPSET = 17


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def from_keras(
    model: Any,
    *,
    inputs: Sequence[InputSpec | str] | None = None,
    **options: Any,
) -> ConversionResult:
    """Exports a Keras 3 model (Sequential, functional or subclassed) and checks it.

    Args:
        model: The Keras model.
        inputs: Input descriptions; taken from ``model.inputs`` when None (a subclassed
            model has none: describe its inputs).
        **options: As for :func:`from_tf` (``output_names``, ``opset``, ``data``,
            ``batch_sizes``, ``atol``, ``rtol``, ``min_cosine``, ``static_batch``, ``seed``,
            ``check``).

    Returns:
        The model, its fidelity record and the exporter used.
    """
    tf = _tf()
    static_batch = bool(options.get("static_batch", False))
    model_inputs = _keras_inputs(model)
    specs = _specs(inputs, static_batch)
    if specs is None:
        if options.get("data") is not None:
            specs = [_spec_from_array(n, np.asarray(a), static_batch) for n, a in options["data"].items()]
        elif model_inputs is None:
            raise InputError(
                f"the Keras model {type(model).__name__} does not declare its inputs (a subclassed "
                "or unbuilt model); describe them with --input NAME:SHAPE:DTYPE"
                + _built_shapes_hint(model)
            )
        else:
            specs = [
                InputSpec(
                    name,
                    tuple(
                        Dim(2, "batch") if i == 0 and size is None and not static_batch
                        else Dim(16, f"{name}_dim{i}") if size is None
                        else Dim(int(size))
                        for i, size in enumerate(shape)
                    ),
                    np.dtype(dtype),
                )
                for name, shape, dtype in model_inputs
            ]
    if model_inputs is not None:
        expected = [n for n, _, _ in model_inputs]
        names = [s.name for s in specs]
        if len(names) != len(expected):
            raise InputError(
                f"the Keras model expects {len(expected)} input(s) ({_describe_keras(model_inputs)}) "
                f"but {len(names)} were described: {', '.join(names)}"
            )
        unknown = [n for n in names if n not in expected]
        if unknown and len(unknown) < len(names):
            # Some names are the model's and some are not: a misspelt name, not renaming.
            raise InputError(
                f"input(s) {', '.join(unknown)} are not inputs of the Keras model; it expects "
                f"{_describe_keras(model_inputs)}; described: {', '.join(names)}"
            )
        if sorted(names) == sorted(expected) and names != expected:
            specs = sorted(specs, key=lambda s: expected.index(s.name))
        for spec, (name, shape, _) in zip(specs, model_inputs, strict=True):
            if len(spec.dims) != len(shape) or any(
                size is not None and d.size != size and not d.dynamic
                for d, size in zip(spec.dims, shape, strict=True)
            ):
                raise InputError(
                    f"input '{spec.name}' is described as {spec} but the Keras model expects "
                    f"{_describe_keras(model_inputs)}"
                )
    single = len(specs) == 1

    @tf.autograph.experimental.do_not_convert
    def call(*args: Any) -> Any:
        return model(args[0] if single else list(args), training=False)

    function = tf.function(call, input_signature=_signature(specs), autograph=False)
    if not options.get("output_names"):
        options["output_names"] = _keras_output_names(model)
    return _convert(function, specs, exporter="tf2onnx from_function (Keras model wrapped as a tf.function)", **options)


def from_tf(
    function: Any,
    *,
    inputs: Sequence[InputSpec | str] | None = None,
    signature: str | None = None,
    **options: Any,
) -> ConversionResult:
    """Exports a ``tf.function``, a ``tf.Module`` or a SavedModel signature and checks it.

    Args:
        function: A ``tf.function`` (with or without an input signature), a concrete
            function, a ``tf.Module`` with a ``__call__`` function or SavedModel signatures,
            or a Keras model (handed to :func:`from_keras`).
        inputs: Input descriptions; taken from the function's input signature when None.
        signature: The SavedModel signature of a loaded ``tf.Module`` to convert.
        **options: ``output_names``, ``opset`` (<= 18), ``data``, ``batch_sizes``, ``atol``,
            ``rtol``, ``min_cosine``, ``static_batch``, ``seed``, ``check``, ``progress``
            (called with a short description as each stage starts).

    Returns:
        The model, its fidelity record and the exporter used.

    Raises:
        InputError: The inputs do not fit, or the object is none of the above.
        ConversionError: tf2onnx cannot convert an op (named in the message).
        ValidationFailedError: ``check`` and the export does not match TensorFlow.
    """
    tf = _tf()
    import keras

    if isinstance(function, keras.Model):
        return from_keras(function, inputs=inputs, **options)
    static_batch = bool(options.get("static_batch", False))
    specs = _specs(inputs, static_batch)
    signatures = getattr(function, "signatures", None)
    if signature is not None or (
        signatures and not isinstance(getattr(function, "__call__", None), tf.types.experimental.PolymorphicFunction)
    ):
        if not signatures:
            raise InputError(f"the object has no SavedModel signatures to pick '{signature}' from")
        name = signature or ("serving_default" if "serving_default" in signatures else next(iter(signatures)))
        if name not in signatures:
            raise InputError(
                f"no signature '{name}'; the SavedModel has: {', '.join(signatures)}"
            )
        return _from_concrete(signatures[name], specs, name, **options)
    if isinstance(function, tf.types.experimental.ConcreteFunction):
        return _from_concrete(function, specs, "concrete function", **options)
    if not isinstance(function, tf.types.experimental.PolymorphicFunction):
        call = getattr(function, "__call__", None)
        if isinstance(function, tf.Module) and isinstance(call, tf.types.experimental.PolymorphicFunction):
            function = call
        else:
            raise InputError(
                f"expected a Keras model, a tf.function, a tf.Module or a SavedModel, got "
                f"{type(function).__name__}"
            )
    declared = function.input_signature
    if specs is None:
        if declared is None:
            if options.get("data") is not None:
                specs = [_spec_from_array(n, np.asarray(a), static_batch) for n, a in options["data"].items()]
            else:
                raise InputError(
                    "the tf.function has no input_signature; describe its inputs with "
                    "--input NAME:SHAPE:DTYPE"
                )
        else:
            specs = _specs_from_tensor_specs(declared, _python_arg_names(function), static_batch)
    elif declared is not None:
        flat = tf.nest.flatten(declared)
        if len(flat) != len(specs):
            raise InputError(
                f"the tf.function takes {len(flat)} input(s) "
                f"({_describe_tensor_specs(flat, _python_arg_names(function))}) but "
                f"{len(specs)} were described: {', '.join(s.name for s in specs)}"
            )
    wrapped = tf.function(
        lambda *args: function(*args), input_signature=_signature(specs), autograph=False
    )
    return _convert(wrapped, specs, exporter="tf2onnx from_function", **options)


def _from_concrete(concrete: Any, specs: list[InputSpec] | None, label: str, **options: Any) -> ConversionResult:
    """A concrete function (a SavedModel signature): keyword inputs, dict outputs by key."""
    tf = _tf()
    static_batch = bool(options.get("static_batch", False))
    args, kwargs = concrete.structured_input_signature
    if args:
        names = [s.name or f"input_{i}" for i, s in enumerate(tf.nest.flatten(args))]
        declared = tf.nest.flatten(args)
        by_keyword = False
    else:
        names = sorted(kwargs)
        declared = [kwargs[n] for n in names]
        by_keyword = True
    display = _clean_names(names)
    if specs is None:
        specs = _specs_from_tensor_specs(declared, display, static_batch, prefer_names=True)
    else:
        given = [s.name for s in specs]
        if by_keyword and sorted(given) not in (sorted(names), sorted(display)):
            raise InputError(
                f"the signature '{label}' takes {_describe_tensor_specs(declared, display)}; "
                f"described: {', '.join(given)}"
            )
        if by_keyword:
            lookup = names if sorted(given) == sorted(names) else display
            specs = sorted(specs, key=lambda s: lookup.index(s.name))
        elif len(given) != len(names):
            raise InputError(
                f"the signature '{label}' takes {_describe_tensor_specs(declared, names)}; "
                f"described: {', '.join(given)}"
            )
    outputs = concrete.structured_outputs
    keys = sorted(outputs) if isinstance(outputs, Mapping) else None
    if keys and not options.get("output_names"):
        options["output_names"] = list(keys)

    def call(*values: Any) -> Any:
        result = concrete(**dict(zip(names, values, strict=True))) if by_keyword else concrete(*values)
        if isinstance(result, Mapping):
            return [result[k] for k in sorted(result)]
        return result

    wrapped = tf.function(call, input_signature=_signature(specs), autograph=False)
    return _convert(wrapped, specs, exporter=f"tf2onnx from_function (signature {label})", **options)


def _convert(
    function: Any,
    specs: list[InputSpec],
    *,
    exporter: str,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_cosine: float | None = None,
    static_batch: bool = False,
    seed: int = DEFAULT_SEED,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """tf2onnx on one tf.function with a signature, then the fidelity check."""
    tf = _tf()
    import tf2onnx

    start = time.perf_counter()
    if opset is not None and opset > MAX_TF_OPSET:
        raise InputError(f"--opset {opset}: tf2onnx writes opsets up to {MAX_TF_OPSET}")
    if data is not None:
        missing = [s.name for s in specs if s.name not in data]
        if missing:
            raise InputError(
                f"--data lacks input(s) {', '.join(missing)}; it has {', '.join(data)}; "
                f"the inputs are {', '.join(s.name for s in specs)}"
            )

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = [tf.convert_to_tensor(feeds[s.name]) for s in specs]
        return [np.asarray(t) for t in tf.nest.flatten(function(*values))]

    example = generate_inputs(specs, 2 if not static_batch else None, seed)
    try:
        n_outputs = len(reference(example))
    except Exception as exc:
        raise InputError(
            f"the model fails on the described inputs ({', '.join(str(s) for s in specs)}): "
            f"{type(exc).__name__}: {first_lines(str(exc), 4)}"
        ) from exc
    function, nested_names = _flatten_nested_outputs(function)
    if not output_names:
        output_names = nested_names or _structured_output_names(function, n_outputs)
    names = list(output_names) if output_names else default_output_names(n_outputs)
    if len(names) != n_outputs:
        raise InputError(
            f"{len(names)} output name(s) given ({', '.join(names)}) but the model returns "
            f"{n_outputs} tensor(s)"
        )
    messages: list[str] = []
    if progress is not None:
        progress("converting with tf2onnx")
    with _collect_tf2onnx_errors(messages), captured_stdout("tf2onnx"), quiet_framework_logs():
        try:
            proto = _tf2onnx_from_function(function, opset or DEFAULT_TF_OPSET)
        except Exception as exc:  # tf2onnx raises many types
            detail = "\n".join([*messages, f"{type(exc).__name__}: {exc}"])
            raise ConversionError(f"tf2onnx failed: {first_lines(detail)}") from exc
    _check_ops(proto, messages)
    model = ir.from_proto(proto)
    _rename(model, specs, names)

    sizes = check_batch_sizes(specs, batch_sizes)
    if data is not None:
        batches = batches_from_data(data, sizes)
        source = "data"
    else:
        batches = [generate_inputs(specs, b, seed, vary=i > 0) for i, b in enumerate(sizes)]
        source = f"generated, seed {seed}" + (
            "; dynamic dims shrunk at the larger batch" if len(sizes) > 1 else ""
        )
    record, observed = check_export(model, reference, batches, atol=atol, rtol=rtol, min_cosine=min_cosine,
                                    inputs=source, progress=progress)
    fix_output_shapes(model, observed)
    result = ConversionResult(
        model=model,
        fidelity=record,
        exporter=exporter,
        exporter_note="tf2onnx " + tf2onnx.__version__,
        opset=model_opset(model),
        seconds=time.perf_counter() - start,
        inputs=[describe_value(v) for v in model.graph.inputs],
        outputs=[describe_value(v) for v in model.graph.outputs],
    )
    if check and not record.passed:
        try:
            record.raise_if_failed("the ONNX export")
        except ValidationFailedError as exc:
            exc.result = result  # type: ignore[attr-defined]
            raise
    return result


def _convert_erfc(ctx: Any, node: Any, name: str, args: Any) -> None:
    """``Erfc(x) = 1 - Erf(x)``.

    tf2onnx 1.17 has no handler for ``Erfc``, and Keras 3 computes the exact GELU
    (``keras.activations.gelu(approximate=False)``, the default) as ``0.5 x erfc(-x/sqrt 2)``,
    so every Keras model with a GELU would otherwise fail to convert.
    """
    from tf2onnx import utils

    dtype = ctx.get_dtype(node.input[0])
    one = ctx.make_const(
        utils.make_name(f"{node.name}_one"),
        np.array(1, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype)),
    )
    node.type = "Erf"
    sub = ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{node.name}_erfc"),
        inputs=[one.output[0], node.output[0]],
    )
    ctx.set_dtype(sub.output[0], dtype)
    ctx.copy_shape(node.output[0], sub.output[0])


#: TensorFlow ops tf2onnx lacks, converted here: ``{tf_op: (handler, args)}``.
_EXTRA_OP_HANDLERS: dict[str, tuple[Callable[..., None], list[Any]]] = {
    "Erfc": (_convert_erfc, []),
}


def _flatten_nested_outputs(function: Any) -> tuple[Any, list[str] | None]:
    """A function returning nested dicts becomes one returning a flat list; names by path.

    tf2onnx names a dict's outputs by key and fails on a dict inside a dict (``'dict' object
    has no attribute 'name'``). Such outputs are flattened in ``tf.nest`` order (sorted keys)
    and named by their joined keys (``{"b": {"c": t}}`` is ``b_c``).
    """
    tf = _tf()
    outputs = function.get_concrete_function(*function.input_signature).structured_outputs
    if not isinstance(outputs, Mapping) or all(isinstance(v, tf.Tensor) for v in outputs.values()):
        return function, None

    def paths(value: Any, prefix: str) -> list[str]:
        if isinstance(value, Mapping):
            return [p for k in sorted(value) for p in paths(value[k], f"{prefix}_{k}" if prefix else str(k))]
        if isinstance(value, (list, tuple)):
            return [p for i, v in enumerate(value) for p in paths(v, f"{prefix}_{i}" if prefix else str(i))]
        return [prefix] if value is not None else []

    names = paths(outputs, "")
    flat = tf.function(
        lambda *args: tf.nest.flatten(function(*args)),
        input_signature=function.input_signature, autograph=False,
    )
    return flat, names if len(set(names)) == len(names) else None


def _structured_output_names(function: Any, count: int) -> list[str] | None:
    """The keys of a function that returns a flat dict of tensors, in tf.nest order."""
    tf = _tf()
    outputs = function.get_concrete_function(*function.input_signature).structured_outputs
    if isinstance(outputs, Mapping) and len(outputs) == count and all(
        isinstance(v, tf.Tensor) for v in outputs.values()
    ):
        return [str(k) for k in sorted(outputs)]
    return None


def _tf2onnx_from_function(function: Any, opset: int) -> onnx.ModelProto:
    """``tf2onnx.convert.from_function`` with only the signature's tensors as inputs.

    tf2onnx takes every input of the concrete function as a graph input, including tensors
    the function captured (an eager ``tf.constant`` it closes over), which would then have to
    be fed at run time. Here the inputs are the signature's tensors alone, so captures are
    frozen into constants like variables are.
    """
    tf = _tf()
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common, tensor_names_from_structed

    concrete = function.get_concrete_function(*function.input_signature)
    n_user = len([t for t in tf.nest.flatten(concrete.structured_input_signature)
                  if isinstance(t, tf.TensorSpec)])
    input_names = [t.name for t in concrete.inputs[:n_user]]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tensor_names_from_structed(concrete, input_names, output_names)
    with tf.device("/cpu:0"):
        graph_def = tf_loader.from_function(concrete, input_names, output_names)
        proto, _ = _convert_common(
            graph_def,
            name=concrete.name,
            continue_on_error=True,
            opset=opset,
            custom_op_handlers=_EXTRA_OP_HANDLERS,
            input_names=input_names,
            output_names=output_names,
            tensors_to_rename=renames,
        )
    return proto


@contextlib.contextmanager
def _collect_tf2onnx_errors(messages: list[str]) -> Iterator[None]:
    """Keeps tf2onnx's error log lines (they name the ops it could not convert)."""

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                messages.append(record.getMessage())

    handler = _Keep()
    tf_logger = logging.getLogger("tf2onnx")
    saved = tf_logger.level, tf_logger.propagate
    tf_logger.addHandler(handler)
    tf_logger.setLevel(logging.ERROR)
    tf_logger.propagate = False  # collected here and raised, not printed twice
    try:
        yield
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(saved[0])
        tf_logger.propagate = saved[1]


def _check_ops(proto: onnx.ModelProto, messages: list[str]) -> None:
    """Raises ConversionError when tf2onnx left TensorFlow ops in the graph."""
    imports = {o.domain: o.version for o in proto.opset_import}
    unknown: list[str] = []
    for node in _all_nodes(proto.graph):
        domain = node.domain or ""
        if domain in ("", "ai.onnx"):
            if not onnx.defs.has(node.op_type, ""):
                unknown.append(node.op_type)
        elif domain not in imports:
            unknown.append(f"{domain}::{node.op_type}")
    if unknown:
        ops = sorted(set(unknown))
        detail = "\n".join(m for m in messages if m) or "tf2onnx left them unconverted"
        raise ConversionError(
            f"tf2onnx cannot convert TensorFlow op(s) {', '.join(ops)}:\n{first_lines(detail)}",
            op=ops[0],
        )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _rename(model: ir.Model, specs: list[InputSpec], output_names: list[str]) -> None:
    """Gives the graph inputs and outputs the described names (in order) and dim names."""
    input_names = [s.name for s in specs]
    taken = {v.name for v in _values(model)}
    for value, name in [*zip(model.graph.inputs, input_names, strict=False),
                        *zip(model.graph.outputs, output_names, strict=False)]:
        if value.name == name:
            continue
        if name in taken:
            # Another value already has the name: move it aside first.
            for other in _values(model):
                if other.name == name and other is not value:
                    other.name = f"{name}__renamed"
        value.name = name
        taken.add(name)
    # tf2onnx names every unknown dimension unk__N; use the descriptions' names instead.
    renames: dict[str, str] = {}
    for value, spec in zip(model.graph.inputs, specs, strict=False):
        if value.shape is None or len(value.shape) != len(spec.dims):
            continue
        for d, dim in zip(value.shape, spec.dims, strict=True):
            if isinstance(d, ir.SymbolicDim) and d.value and dim.dynamic:
                renames.setdefault(d.value, dim.name)
    batch = next((s.dims[0].name for s in specs if s.batch_dynamic), None)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in renames else d
            for d in value.shape
        ]
        if batch and value in model.graph.outputs and dims and isinstance(dims[0], ir.SymbolicDim):
            dims[0] = ir.SymbolicDim(batch)
        value.shape = ir.Shape(dims)


def _values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node.outputs


def _specs(inputs: Sequence[InputSpec | str] | None, static_batch: bool) -> list[InputSpec] | None:
    if not inputs:
        return None
    texts = [i for i in inputs if isinstance(i, str)]
    parsed = iter(parse_inputs(texts, static_batch=static_batch))
    return [next(parsed) if isinstance(i, str) else i for i in inputs]


def _spec_from_array(name: str, array: np.ndarray, static_batch: bool) -> InputSpec:
    dims = tuple(
        Dim(max(int(s), 2), "batch") if i == 0 and not static_batch else Dim(int(s))
        for i, s in enumerate(array.shape)
    )
    low = high = None
    if np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max()) + 1
    return InputSpec(name, dims, array.dtype, low, high)


def _signature(specs: list[InputSpec]) -> list[Any]:
    tf = _tf()
    return [
        tf.TensorSpec(
            [None if d.dynamic else d.size for d in s.dims], tf.as_dtype(s.dtype), name=s.name
        )
        for s in specs
    ]


def _clean_names(names: Sequence[str]) -> list[str]:
    """``input``/``input_N`` for the ``keras_tensor_N`` names Keras gives unnamed inputs."""
    return [
        ("input" if len(names) == 1 else f"input_{i}") if n.startswith("keras_tensor") else n
        for i, n in enumerate(names)
    ]


def _specs_from_tensor_specs(
    declared: Any, names: list[str], static_batch: bool, *, prefer_names: bool = False
) -> list[InputSpec]:
    tf = _tf()
    specs = []
    for index, spec in enumerate(tf.nest.flatten(declared)):
        given = names[index] if index < len(names) else None
        name = (given if prefer_names and given else spec.name or given) or f"input_{index}"
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        if shape is None:
            raise InputError(f"input '{name}' has unknown rank; describe it with --input")
        dims = tuple(
            Dim(2, "batch") if i == 0 and (size is None or not static_batch)
            else Dim(16, f"{name}_dim{i}") if size is None
            else Dim(int(size))
            for i, size in enumerate(shape)
        )
        if spec.dtype == tf.string:
            raise InputError(
                f"input '{name}' is a string tensor; onnxpress converts numeric and bool inputs only"
            )
        specs.append(InputSpec(name, dims, np.dtype(spec.dtype.as_numpy_dtype)))
    return specs


def _python_arg_names(function: Any) -> list[str]:
    import inspect

    try:
        return [p for p in inspect.signature(function.python_function).parameters if p != "self"]
    except (AttributeError, TypeError, ValueError):
        return []


def _describe_tensor_specs(declared: Sequence[Any], names: Sequence[str]) -> str:
    parts = []
    for index, spec in enumerate(declared):
        name = names[index] if index < len(names) else (spec.name or f"input_{index}")
        shape = "x".join("?" if s is None else str(s) for s in spec.shape.as_list()) if spec.shape.rank is not None else "?"
        parts.append(f"{name}:{shape}:{spec.dtype.name}")
    return ", ".join(parts)


def _keras_inputs(model: Any) -> list[tuple[str, list[int | None], str]] | None:
    """``(name, shape, dtype)`` of each declared input of a Keras model, or None."""
    try:
        tensors = model.inputs
    except (AttributeError, ValueError):
        return None
    if not tensors:
        return None
    result = []
    for index, tensor in enumerate(tensors):
        name = getattr(tensor, "name", None) or ""
        if not name or name.startswith("keras_tensor"):
            # An Input() without a name: Keras calls it keras_tensor_N.
            name = "input" if len(tensors) == 1 else f"input_{index}"
        try:
            dtype = str(np.dtype(str(tensor.dtype)))
        except TypeError as exc:
            raise InputError(
                f"input '{name}' of the Keras model has dtype {tensor.dtype}; onnxpress converts "
                "numeric and bool inputs only"
            ) from exc
        result.append((name, list(tensor.shape), dtype))
    return result


def _built_shapes_hint(model: Any) -> str:
    """``; it was built with input shape (1, 5): e.g. --input x:Bx5:float32`` when known.

    A subclassed model records the shapes of its first call (``_build_shapes_dict``, a
    private Keras 3 attribute read defensively). The dtype is not recorded, so the shapes are
    only a hint, not a description onnxpress would guess on the user's behalf.
    """
    shapes = getattr(model, "_build_shapes_dict", None)
    if not isinstance(shapes, Mapping) or not shapes:
        return ""
    hints = []
    for key, shape in shapes.items():
        if not isinstance(shape, (tuple, list)) or not all(d is None or isinstance(d, int) for d in shape):
            return ""
        name = "x" if key in ("input_shape", "inputs_shape") else key.removesuffix("_shape")
        dims = ["B", *("?" if d is None else str(d) for d in shape[1:])] if shape else ["scalar"]
        hints.append(f"--input {name}:{'x'.join(dims)}:float32")
    built = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
    return f"; it was built with {built}: e.g. {' '.join(hints)} (check the dtype)"


def _describe_keras(inputs: list[tuple[str, list[int | None], str]]) -> str:
    return ", ".join(
        f"{name}:{'x'.join('?' if s is None else str(s) for s in shape)}:{dtype}"
        for name, shape, dtype in inputs
    )


def _keras_output_names(model: Any) -> list[str] | None:
    """Layer names of a functional model's outputs, listed in the order it returns them.

    A model that returns a dict is left to the dict's keys (in ``tf.nest`` order), which is
    also the order of the ONNX outputs.
    """
    names = getattr(model, "output_names", None)
    try:
        outputs = model.outputs
        if isinstance(model.output, Mapping):
            return None
    except (AttributeError, ValueError):
        return None
    if names and outputs and len(names) == len(outputs) and len(set(names)) == len(names):
        return list(names) if len(names) > 1 else ["output"]
    return None


def load_tf_source(source: str) -> Any:
    """The Keras model, tf.Module or tf.function that SOURCE names.

    Args:
        source: A SavedModel folder, a ``.keras`` file (loaded in safe mode), or
            ``package.module:callable`` / ``path/file.py:callable`` returning one.

    Raises:
        InputError: The source is missing, unreadable or returns something else.
    """
    tf = _tf()
    path = Path(source)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise InputError(f"{path}: not a SavedModel folder (no saved_model.pb)")
        try:
            return tf.saved_model.load(str(path))
        except Exception as exc:
            raise InputError(f"{path}: cannot load the SavedModel: {first_lines(str(exc), 3)}") from exc
    if source.endswith(".keras") and ":" not in source:
        import keras

        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            return keras.saving.load_model(str(path), safe_mode=True, compile=False)
        except Exception as exc:
            raise InputError(
                f"{path}: cannot load the Keras file in safe mode: {first_lines(str(exc), 3)}"
            ) from exc
    if source.endswith((".h5", ".hdf5")) and ":" not in source:
        raise InputError(
            f"{path}: legacy HDF5 Keras files are not loaded (they have no safe mode); load it "
            "in Keras you trust and save it as .keras or export a SavedModel"
        )
    if ":" not in source:
        raise InputError(
            f"'{source}': expected a SavedModel folder, a .keras file, or package.module:callable"
        )
    factory = load_callable(source)
    made = _call_factory(factory, source)
    return made


def _call_factory(factory: Callable[..., Any], source: str) -> Any:
    import keras

    tf = _tf()
    if isinstance(factory, (keras.Model, tf.types.experimental.PolymorphicFunction, tf.Module)):
        return factory
    if not callable(factory):
        raise InputError(f"'{source}' is a {type(factory).__name__}, not a callable")
    try:
        made = factory()
    except Exception as exc:  # the user's factory can raise anything
        raise InputError(
            f"'{source}': calling it failed: {type(exc).__name__}: {first_lines(str(exc), 3)}"
        ) from exc
    if not isinstance(made, (keras.Model, tf.types.experimental.PolymorphicFunction,
                             tf.types.experimental.ConcreteFunction, tf.Module)):
        raise InputError(
            f"'{source}' returned a {type(made).__name__}; expected a Keras model, a tf.Module "
            "or a tf.function"
        )
    return made


def convert_tf_source(source: str, *, signature: str | None = None, **options: Any) -> ConversionResult:
    """Loads SOURCE (see :func:`load_tf_source`) and converts it with :func:`from_tf`.

    A SavedModel folder converts through a signature (``serving_default`` when there is one)
    rather than its restored ``__call__``, whose input signature may be lost.
    """
    loaded = load_tf_source(source)
    signatures = getattr(loaded, "signatures", None)
    if signature is None and Path(source).is_dir() and signatures:
        signature = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    return from_tf(loaded, signature=signature, **options)


__all__ = ["convert_tf_source", "from_keras", "from_tf", "load_tf_source"]
