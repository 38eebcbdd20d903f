"""PyTorch to ONNX with ``torch.onnx``: the dynamo exporter first, TorchScript as the fallback.

:func:`from_torch` exports an ``nn.Module`` (or a ``torch.export.ExportedProgram``) with the
inputs described as :class:`~onnxpress.converters.specs.InputSpec` (dynamic dimensions become
``torch.export.Dim`` objects, shared by name across inputs), then checks the export against
PyTorch with :func:`~onnxpress.converters.fidelity.check_fidelity` at batch size 1 and a larger
one. The dynamo exporter (``torch.export`` + onnxscript) gives an ``onnx_ir`` model directly,
so even models over 2 GB never pass through one protobuf; when it fails, the TorchScript
exporter is tried and the result records which exporter ran and why.

:func:`load_torch_spec` turns the CLI's SPEC into a module: ``package.module:callable``,
``path/file.py:callable`` (the callable returns a module, or a module and example inputs), or
a ``.pt2`` file from ``torch.export.save``. ``torch.export.load`` falls back to unrestricted
pickle when ``weights_only`` loading fails; onnxpress loads ``.pt2`` files with every
``torch.load`` forced to ``weights_only=True`` and plain ``pickle.loads`` refused, so an
untrusted archive cannot run code.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pickle
import tempfile
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
    FidelityRecord,
)
from onnxpress.converters.result import (
    ConversionError,
    ConversionResult,
    captured_fds,
    captured_stdout,
    check_export,
    default_output_names,
    describe_value,
    find_op_name,
    first_lines,
    fix_output_shapes,
    model_opset,
    quiet_framework_logs,
    root_cause,
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

from onnxpress.errors import InputError

logger = logging.getLogger(__name__)

#: Opset of the TorchScript fallback when none is asked for.
TORCHSCRIPT_DEFAULT_OPSET = 17
#: File suffixes of pickled PyTorch objects, which SPEC refuses.
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")
#: Batch size of the example the exporter traces (2, so a dynamic batch is not specialized to 1).
EXPORT_BATCH = 2


def from_torch(
    module: Any,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    inputs: Sequence[InputSpec | str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_cosine: float | None = None,
    exporter: str = "auto",
    static_batch: bool = False,
    seed: int = DEFAULT_SEED,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Exports a PyTorch module to ONNX and checks it against PyTorch.

    Args:
        module: An ``nn.Module`` or a ``torch.export.ExportedProgram``.
        example_inputs: Example tensors (a tuple, or a dict by argument name). Their dtypes
            and non-batch sizes describe the inputs when ``inputs`` is None; integer examples
            also bound the integer values generated for the check.
        inputs: Input descriptions (:class:`InputSpec` or ``NAME:SHAPE:DTYPE`` strings). The
            names are the forward arguments', or, when they are not, the ONNX input names of
            the positional arguments in order.
        output_names: ONNX names of the outputs (flattened in PyTorch's order).
        opset: Target opset; the exporter's default when None.
        data: Check inputs by name (rows are the batch); generated from the descriptions with
            ``seed`` when None.
        batch_sizes: Batch sizes of the check (only the fixed size when batch is static).
        atol: Absolute tolerance of the check.
        rtol: Relative tolerance of the check.
        min_cosine: Lowest cosine per output the check accepts, or None.
        exporter: ``"auto"`` (dynamo, then TorchScript), ``"dynamo"`` or ``"torchscript"``.
        static_batch: Keep the first dimension fixed.
        seed: Seed of generated inputs.
        check: Raise ValidationFailedError when the check fails (the record says so either way).
        progress: Called with a short description as each stage starts.

    Returns:
        The model, its fidelity record and which exporter ran.

    Raises:
        InputError: The inputs do not fit the model (the message names what it expects).
        ConversionError: Neither exporter converts the model (names the op when known).
        ValidationFailedError: ``check`` and the export does not match PyTorch.
    """
    import torch

    start = time.perf_counter()
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise InputError(f"exporter '{exporter}': expected auto, dynamo or torchscript")
    if isinstance(module, torch.export.ExportedProgram):
        program = module
        module = program.module()
        params = _program_input_names(program)
        if inputs is None and data is None:
            # The program knows which dimensions it exported as dynamic.
            inputs = _specs_from_program(program, params, example_inputs)
    else:
        program = None
        if not isinstance(module, torch.nn.Module):
            raise InputError(
                f"expected a torch.nn.Module or ExportedProgram, got {type(module).__name__}"
            )
        params = None
    with contextlib.suppress(NotImplementedError):  # an ExportedProgram's module refuses eval()
        module.eval()
    signature = _forward_signature(module, params)
    specs = _resolve_specs(signature, example_inputs, inputs, data, static_batch)
    # An ExportedProgram's module takes its inputs positionally only.
    by_name = _binds_by_name(signature, specs) and program is None

    example = _export_example(specs, data, example_inputs, seed)
    args, kwargs = _to_torch_args(specs, example, by_name)
    structure_names = _dry_run(module, args, kwargs, specs, signature)
    n_outputs = len(structure_names)
    if not output_names:
        output_names = structure_names
    elif len(output_names) != n_outputs:
        raise InputError(
            f"{len(output_names)} output name(s) given ({', '.join(output_names)}) but the "
            f"model returns {n_outputs} tensor(s)"
        )

    names = [s.name for s in specs]
    onnx_model, used, note = _export(
        module if program is None else program, args, kwargs, specs, names, output_names,
        opset, exporter, by_name, signature, progress or (lambda _: None),
    )

    sizes = check_batch_sizes(specs, batch_sizes)
    if data is not None:
        batches = batches_from_data(data, sizes)
        source = "data"
    else:
        batches = [generate_inputs(specs, b, seed, vary=i > 0) for i, b in enumerate(sizes)]
        source = f"generated, seed {seed}" + (
            "; dynamic dims shrunk at the larger batch" if len(sizes) > 1 else ""
        )

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        call_args, call_kwargs = _to_torch_args(specs, feeds, by_name)
        with torch.no_grad():
            out = module(*call_args, **call_kwargs)
        return _flatten_outputs(out)

    def checked(model: ir.Model) -> tuple[FidelityRecord, list[list[int]]]:
        return check_export(model, reference, batches, atol=atol, rtol=rtol, min_cosine=min_cosine,
                            inputs=source, progress=progress)

    note += _pinned_dims_note(onnx_model, specs)
    record, observed = checked(onnx_model)
    if not record.passed and exporter == "auto" and used == "torch.onnx dynamo":
        # The dynamo export ran but does not match PyTorch (e.g. an RNN lowered with a
        # pinned size): the TorchScript export may, and a user wants the one that does.
        why = (record.failures() or ["outputs differ"])[0]
        logger.warning("The dynamo export fails the fidelity check (%s); trying the TorchScript exporter", why)
        try:
            fallback, _, _ = _export(
                module if program is None else program, args, kwargs, specs, names,
                output_names, opset, "torchscript", by_name, signature, progress or (lambda _: None),
            )
            fallback_note = _pinned_dims_note(fallback, specs)
            fallback_record, fallback_observed = checked(fallback)
        except Exception as exc:  # the exporter or onnxruntime raise many types
            note += f"; the dynamo export fails the fidelity check and the TorchScript fallback failed: {root_cause(exc)}"
        else:
            if fallback_record.passed:
                onnx_model, record, observed = fallback, fallback_record, fallback_observed
                used = "torch.onnx torchscript"
                note = (
                    f"the dynamo export failed the fidelity check ({_shorten(why)}); "
                    "the TorchScript export passed it" + fallback_note
                )
            else:
                note += "; the dynamo export fails the fidelity check and so does the TorchScript fallback"
    fix_output_shapes(onnx_model, observed)
    result = ConversionResult(
        model=onnx_model,
        fidelity=record,
        exporter=used,
        exporter_note=note,
        opset=model_opset(onnx_model),
        seconds=time.perf_counter() - start,
        inputs=[describe_value(v) for v in onnx_model.graph.inputs],
        outputs=[describe_value(v) for v in onnx_model.graph.outputs],
    )
    if check:
        _raise_with_result(result)
    return result


def _shorten(text: str, limit: int = 200) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _pinned_dims_note(model: ir.Model, specs: list[InputSpec]) -> str:
    """Names the dimensions described as dynamic that the export fixed to a number.

    An exporter fixes a dimension when the model's code uses its size as a constant (for
    instance ``range(x.shape[1])`` or ``int(x.size(1))``); the fidelity check then fails at
    the other size, and this note says why.
    """
    by_name = {v.name: v for v in model.graph.inputs}
    pinned = []
    for spec in specs:
        value = by_name.get(spec.name)
        if value is None or value.shape is None or len(value.shape) != len(spec.dims):
            continue
        for axis, (dim, actual) in enumerate(zip(spec.dims, value.shape, strict=True)):
            if dim.dynamic and isinstance(actual, int):
                pinned.append(f"{spec.name}[{axis}] '{dim.name}' = {actual}")
    if not pinned:
        return ""
    logger.warning(
        "The export fixed dimension(s) described as dynamic: %s (the model's code uses their "
        "size as a constant)", ", ".join(pinned),
    )
    return (
        f"; the export fixed dimension(s) described as dynamic: {', '.join(pinned)} (the "
        "model's code uses their size as a constant)"
    )


def _raise_with_result(result: ConversionResult) -> None:
    """Raises ValidationFailedError carrying the result when the check failed."""
    from onnxpress.errors import ValidationFailedError

    try:
        result.fidelity.raise_if_failed("the ONNX export")
    except ValidationFailedError as exc:
        exc.result = result  # type: ignore[attr-defined]
        raise


class _Signature:
    """The forward arguments: names, which are required, and whether ``*args`` is taken."""

    def __init__(self, names: list[str], required: int, var_positional: bool,
                 keyword_only: list[str], var_name: str = "args") -> None:
        self.names = names
        self.required = required
        self.var_positional = var_positional
        self.keyword_only = keyword_only
        self.var_name = var_name

    def describe(self) -> str:
        parts = [n if i < self.required else f"{n}=optional" for i, n in enumerate(self.names)]
        if self.var_positional:
            parts.append("*args")
        parts += [f"{n} (keyword)" for n in self.keyword_only]
        return ", ".join(parts) if parts else "no inputs"


def _forward_signature(module: Any, names: list[str] | None) -> _Signature:
    if names is not None:
        return _Signature(names, len(names), False, [])
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return _Signature([], 0, True, [])
    positional, keyword_only = [], []
    required = 0
    var_positional = False
    var_name = "args"
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
            if p.default is p.empty and required == len(positional) - 1:
                required += 1
        elif p.kind == p.VAR_POSITIONAL:
            var_positional = True
            var_name = p.name
        elif p.kind == p.KEYWORD_ONLY:
            keyword_only.append(p.name)
    return _Signature(positional, required, var_positional, keyword_only, var_name)


def _specs_from_program(program: Any, names: list[str], example_inputs: Any) -> list[InputSpec]:
    """Input descriptions from an ExportedProgram: its symbolic dims are the dynamic ones.

    Integer inputs are generated within the range of the program's example inputs.
    """
    import torch

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    examples = example_inputs if example_inputs is not None else (
        program.example_inputs[0] if program.example_inputs else ()
    )
    specs = []
    # One name per symbol: a dimension shared by two inputs (one Dim object) stays shared.
    symbol_names: dict[str, str] = {}
    for index, name in enumerate(names):
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(value, torch.Tensor):
            raise InputError(f"input '{name}' of the program is not a tensor; describe inputs with --input")
        dims = []
        for axis, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                hint = size.node.hint if size.node.has_hint() else None
                symbol = str(size.node.expr)
                if symbol not in symbol_names:
                    wanted = "batch" if axis == 0 else f"{name}_dim{axis}"
                    taken = set(symbol_names.values())
                    symbol_names[symbol] = wanted if wanted not in taken else f"{name}_dim{axis}"
                dim_name = symbol_names[symbol]
                dims.append(Dim(int(hint) if hint else (2 if axis == 0 else 16), dim_name))
            else:
                dims.append(Dim(int(size)))
        low = high = None
        example = examples[index] if index < len(examples) else None
        if isinstance(example, torch.Tensor) and not example.is_floating_point() and example.numel():
            low, high = int(example.min()), int(example.max()) + 1
        dtype = np.dtype(str(value.dtype).removeprefix("torch."))
        specs.append(InputSpec(name, tuple(dims), dtype, low, high))
    return specs


def _program_input_names(program: Any) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT
    ]


def _resolve_specs(
    signature: _Signature,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None,
    inputs: Sequence[InputSpec | str] | None,
    data: Mapping[str, np.ndarray] | None,
    static_batch: bool,
) -> list[InputSpec]:
    """Input descriptions from ``inputs``, else from the examples, else from the data."""
    if inputs:
        texts = [i for i in inputs if isinstance(i, str)]
        parsed = iter(parse_inputs(texts, static_batch=static_batch))
        specs = [next(parsed) if isinstance(i, str) else i for i in inputs]
        if example_inputs is not None:
            specs = _ranges_from_examples(specs, signature, example_inputs)
        return specs
    if example_inputs is not None:
        return _specs_from_examples(signature, example_inputs, static_batch)
    if data is not None:
        return [_spec_from_array(name, np.asarray(a), static_batch) for name, a in data.items()]
    raise InputError(
        "describe the model's inputs with --input NAME:SHAPE:DTYPE (e.g. --input x:Bx3x32x32:float32), "
        f"or pass example inputs or --data; the model's forward takes: {signature.describe()}"
    )


def _example_items(signature: _Signature, example_inputs: Any) -> list[tuple[str, Any]]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return list(example_inputs.items())
    items = []
    for index, value in enumerate(example_inputs):
        name = signature.names[index] if index < len(signature.names) else f"input_{index}"
        items.append((name, value))
    return items


def _spec_from_array(name: str, array: np.ndarray, static_batch: bool) -> InputSpec:
    dims = tuple(
        Dim(max(int(s), 2), "batch") if i == 0 and not static_batch else Dim(int(s))
        for i, s in enumerate(array.shape)
    )
    low = high = None
    if np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max()) + 1
    return InputSpec(name, dims, array.dtype, low, high)


def _specs_from_examples(
    signature: _Signature, example_inputs: Any, static_batch: bool
) -> list[InputSpec]:
    import torch

    specs = []
    for name, value in _example_items(signature, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"example input '{name}' is a {type(value).__name__}; only tensors can be "
                "ONNX inputs (bind other arguments in the module)"
            )
        specs.append(_spec_from_array(name, value.detach().cpu().numpy(), static_batch))
    return specs


def _ranges_from_examples(
    specs: list[InputSpec], signature: _Signature, example_inputs: Any
) -> list[InputSpec]:
    import dataclasses

    ranges = {}
    for name, value in _example_items(signature, example_inputs):
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if np.issubdtype(array.dtype, np.integer) and array.size:
            ranges[name] = (int(array.min()), int(array.max()) + 1)
    return [
        dataclasses.replace(s, low=ranges[s.name][0], high=ranges[s.name][1])
        if s.name in ranges and s.low is None else s
        for s in specs
    ]


def _binds_by_name(signature: _Signature, specs: list[InputSpec]) -> bool:
    """True when inputs go to forward by keyword; False when positionally.

    Raises:
        InputError: The descriptions fit neither way; the message lists forward's arguments.
    """
    names = [s.name for s in specs]
    known = set(signature.names) | set(signature.keyword_only)
    if names and all(n in known for n in names):
        missing = [n for n in signature.names[: signature.required] if n not in names]
        if missing:
            raise InputError(
                f"the model also needs input(s) {', '.join(missing)}; it takes: "
                f"{signature.describe()}; described: {', '.join(names)}"
            )
        return True
    fits = signature.required <= len(names) and (
        signature.var_positional or len(names) <= len(signature.names)
    )
    if not fits:
        raise InputError(
            f"the model takes {signature.describe()}, but {len(names)} input(s) were "
            f"described: {', '.join(names) or 'none'}"
        )
    unknown = [n for n in names if n not in known]
    if unknown and len(unknown) < len(names) and not signature.var_positional:
        # Some names are forward's and some are not: a misspelt name, not positional binding.
        raise InputError(
            f"input(s) {', '.join(unknown)} are not arguments of the model's forward; it "
            f"takes: {signature.describe()}; described: {', '.join(names)}"
        )
    if unknown and not signature.var_positional and len(names) < len(signature.names):
        logger.info(
            "Inputs %s are not forward argument names; binding by position to %s",
            ", ".join(unknown), ", ".join(signature.names[: len(names)]),
        )
    return False


def _export_example(
    specs: list[InputSpec],
    data: Mapping[str, np.ndarray] | None,
    example_inputs: Any,
    seed: int,
) -> dict[str, np.ndarray]:
    """Inputs the exporter traces: data rows when given, else generated at batch 2."""
    if data is not None:
        missing = [s.name for s in specs if s.name not in data]
        if missing:
            raise InputError(
                f"--data lacks input(s) {', '.join(missing)}; it has {', '.join(data)}; "
                f"the inputs are {', '.join(s.name for s in specs)}"
            )
        rows = min(len(data[s.name]) for s in specs) if specs else 0
        if rows >= EXPORT_BATCH or any(not s.batch_dynamic for s in specs):
            take = EXPORT_BATCH if all(s.batch_dynamic for s in specs) else rows
            return {s.name: np.ascontiguousarray(data[s.name][:take]) for s in specs}
    return generate_inputs(specs, EXPORT_BATCH, seed)


def _to_torch_args(
    specs: list[InputSpec], feeds: Mapping[str, np.ndarray], by_name: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    # np.ascontiguousarray makes a 0-d array 1-d; order='C' keeps a scalar input a scalar.
    tensors = [torch.from_numpy(np.array(feeds[s.name], order="C", copy=True)) for s in specs]
    if by_name:
        return (), {s.name: t for s, t in zip(specs, tensors, strict=True)}
    return tuple(tensors), {}


def _dry_run(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             specs: list[InputSpec], signature: _Signature) -> list[str]:
    """Runs the module once so inputs that do not fit fail clearly; returns output names."""
    import torch

    try:
        with torch.no_grad():
            return _output_names(module(*args, **kwargs))
    except Exception as exc:
        described = ", ".join(str(s) for s in specs)
        raise InputError(
            f"the model fails on the described inputs ({described}): "
            f"{type(exc).__name__}: {first_lines(str(exc), 3)}; its forward takes: "
            f"{signature.describe()}"
        ) from exc


def _flatten_outputs(out: Any) -> list[np.ndarray]:
    import torch
    import torch.utils._pytree as pytree

    leaves = pytree.tree_leaves(out)
    return [
        leaf.detach().cpu().numpy() if isinstance(leaf, torch.Tensor) else np.asarray(leaf)
        for leaf in leaves
        if leaf is not None
    ]


def _output_names(out: Any) -> list[str]:
    """Names for the flattened outputs: dict keys or namedtuple fields (``a_b`` when nested), else ``output_N``.

    A single tensor is ``output``; a dict or ``ModelOutput`` gives its keys, so a Hugging
    Face model's output is ``last_hidden_state`` rather than ``output_0``.
    """
    import torch
    import torch.utils._pytree as pytree

    leaves = [
        (path, leaf) for path, leaf in pytree.tree_flatten_with_path(out)[0] if leaf is not None
    ]
    if not leaves:
        return []
    names: list[str] = []
    for path, _ in leaves:
        # MappingKey (dict) has .key; GetAttrKey (a namedtuple field, a dataclass) has .name;
        # SequenceKey (a tuple or list inside a dict) has .idx: {"aux": (a, b)} is aux_0, aux_1.
        named = any(hasattr(k, "key") or hasattr(k, "name") for k in path)
        keys = [
            str(k.key) if hasattr(k, "key") else str(k.name) if hasattr(k, "name") else str(k.idx)
            for k in path if hasattr(k, "key") or hasattr(k, "name") or hasattr(k, "idx")
        ]
        names.append("_".join(keys) if named else "")
    if all(names) and len(set(names)) == len(names) and all(
        isinstance(leaf, torch.Tensor) for _, leaf in leaves
    ):
        return names
    return default_output_names(len(leaves))


def _dim_objects(specs: list[InputSpec]) -> dict[str, Any]:
    import torch

    dims: dict[str, Any] = {}
    for spec in specs:
        for dim in spec.dims:
            if dim.dynamic and dim.name not in dims:
                dims[dim.name] = torch.export.Dim(_identifier(dim.name))
    return dims


def _identifier(name: str) -> str:
    return name if name.isidentifier() else "d_" + "".join(c if c.isalnum() else "_" for c in name)


def _export(
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    specs: list[InputSpec],
    names: list[str],
    output_names: Sequence[str] | None,
    opset: int | None,
    exporter: str,
    by_name: bool,
    signature: _Signature,
    progress: Callable[[str], None],
) -> tuple[ir.Model, str, str]:
    """Runs the exporters in order; returns the model, the exporter used, and why."""
    dynamo_error: Exception | None = None
    if exporter in ("auto", "dynamo"):
        progress("exporting with the dynamo exporter (torch.export)")
        try:
            model = _export_dynamo(
                target, args, kwargs, specs, names, output_names, opset, by_name, signature
            )
            note = "the dynamo exporter (torch.export) succeeded, so the TorchScript fallback was not needed"
            if opset is not None and model_opset(model) != opset:
                note += "; " + _convert_opset(model, opset)
            return model, "torch.onnx dynamo", note
        except Exception as exc:  # the exporter raises many types
            dynamo_error = exc
            if exporter == "dynamo":
                raise _conversion_error("the dynamo exporter", exc) from exc
            logger.warning(
                "The dynamo exporter failed (%s); trying the TorchScript exporter", root_cause(exc)
            )
    module = target.module() if hasattr(target, "module") and not hasattr(target, "forward") else target
    progress("exporting with the TorchScript exporter")
    try:
        model = _export_torchscript(module, args, kwargs, specs, names, output_names, opset, by_name, signature)
    except Exception as exc:
        if dynamo_error is None:
            raise _conversion_error("the TorchScript exporter", exc) from exc
        raise _conversion_error("both exporters", exc, dynamo_error) from exc
    if dynamo_error is None:
        return model, "torch.onnx torchscript", "the TorchScript exporter was asked for"
    return model, "torch.onnx torchscript", f"the dynamo exporter failed: {root_cause(dynamo_error)}"


def _convert_opset(model: ir.Model, opset: int) -> str:
    """Brings a dynamo export to the asked opset (it writes 18 and up); says what happened.

    Raises:
        ConversionError: The version converter cannot reach the opset.
    """
    from onnxscript import version_converter

    written = model_opset(model)
    with quiet_framework_logs():
        try:
            version_converter.convert_version(model, opset, fallback=True)
        except Exception as exc:  # the converters raise many types
            raise ConversionError(
                f"the dynamo exporter writes opset {written}; converting to opset {opset} "
                f"failed: {root_cause(exc)}"
            ) from exc
    if model_opset(model) != opset:
        raise ConversionError(
            f"the dynamo exporter writes opset {written} and the version converter could not "
            f"bring it to opset {opset}"
        )
    _drop_reduce_noop_attribute(model, opset)
    # The converter can leave attributes the older opset lacks; onnx's checker finds them.
    from onnxpress.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, constant_bytes

    if constant_bytes(model) < EXTERNAL_DATA_THRESHOLD_BYTES:
        try:
            onnx.checker.check_model(ir.to_proto(model))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise ConversionError(
                f"the dynamo exporter writes opset {written}; the version converter's opset "
                f"{opset} model is invalid: {first[:300]}"
            ) from exc
    return f"opset {written} converted to {opset} by onnxscript's version converter"


#: Reduce ops that gained ``noop_with_empty_axes`` (with ``axes`` as an input) in opset 18.
_REDUCE_OPS_AXES_INPUT_18 = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSumSquare",
})


def _drop_reduce_noop_attribute(model: ir.Model, opset: int) -> None:
    """Removes ``noop_with_empty_axes=0`` that onnxscript's converter leaves below opset 18.

    The version converter moves a Reduce op's ``axes`` input into the attribute but keeps
    ``noop_with_empty_axes``, which those ops only have from opset 18, so onnx's checker
    rejects the model (e.g. every global average pool at ``--opset 17``). At 0 it is the
    default behaviour, so dropping it changes nothing. A 1 is left for the checker to refuse.
    """
    if opset >= 18:
        return
    from onnxpress.graphs import graph_likes

    for graph in graph_likes(model):
        for node in graph:
            if node.domain in ("", "ai.onnx") and node.op_type in _REDUCE_OPS_AXES_INPUT_18:
                attr = node.attributes.get("noop_with_empty_axes")
                if attr is not None and attr.value == 0:
                    del node.attributes["noop_with_empty_axes"]


def _conversion_error(
    which: str, exc: Exception, first: Exception | None = None
) -> ConversionError:
    messages = [f"{type(e).__name__}: {e}" for e in (first, exc) if e is not None]
    op = None
    for message in messages:
        op = op or find_op_name(message)
    what = f"op '{op}' cannot be converted" if op else "the model cannot be converted"
    labels = (["dynamo"] if first is not None else []) + [which if first is None else "torchscript"]
    errors = [e for e in (first, exc) if e is not None]
    detail = "\n".join(
        f"[{label}] {root_cause(error)}" for label, error in zip(labels, errors, strict=True)
    )
    return ConversionError(f"{which} failed: {what}.\n{detail}", op=op)


def _export_dynamo(
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    specs: list[InputSpec],
    names: list[str],
    output_names: Sequence[str] | None,
    opset: int | None,
    by_name: bool,
    signature: _Signature,
) -> ir.Model:
    import torch

    dims = _dim_objects(specs)
    shapes = [
        {axis: dims[d.name] for axis, d in enumerate(spec.dims) if d.dynamic} or None
        for spec in specs
    ]
    if by_name:
        dynamic_shapes: Any = {s.name: shape for s, shape in zip(specs, shapes, strict=True)}
    elif signature.var_positional and len(shapes) > len(signature.names):
        # forward(self, a, *rest): torch.export wants the extra inputs grouped under *rest.
        named = len(signature.names)
        dynamic_shapes = {n: shape for n, shape in zip(signature.names, shapes[:named], strict=False)}
        dynamic_shapes[signature.var_name] = tuple(shapes[named:])
    else:
        dynamic_shapes = tuple(shapes)
    if not any(shapes):
        dynamic_shapes = None
    if isinstance(target, torch.export.ExportedProgram):
        dynamic_shapes = None
    with captured_stdout("torch.onnx dynamo"), quiet_framework_logs():
        program = torch.onnx.export(
            target,
            args,
            kwargs=kwargs or None,
            input_names=names,
            output_names=list(output_names) if output_names else None,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    model = program.model
    _name_dims(model, specs)
    return model


def _export_torchscript(
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    specs: list[InputSpec],
    names: list[str],
    output_names: Sequence[str] | None,
    opset: int | None,
    by_name: bool,
    signature: _Signature,
) -> ir.Model:
    import torch

    if by_name:
        # TorchScript takes positional arguments only: the inputs must be forward's first ones.
        ordered = [n for n in signature.names if n in kwargs]
        if len(ordered) != len(kwargs) or ordered != signature.names[: len(ordered)]:
            raise ConversionError(
                "the TorchScript exporter needs the inputs to be the leading positional "
                f"arguments of forward ({signature.describe()}); got {', '.join(kwargs)}"
            )
        args = tuple(kwargs[n] for n in ordered)
        names = ordered
    dynamic_axes = {
        spec.name: {axis: d.name for axis, d in enumerate(spec.dims) if d.dynamic}
        for spec in specs
        if any(d.dynamic for d in spec.dims)
    }
    with tempfile.TemporaryDirectory(prefix="onnxpress-ts-") as tmp:
        path = Path(tmp) / "model.onnx"
        with captured_fds("torch.onnx torchscript"), quiet_framework_logs():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(names),
                output_names=list(output_names) if output_names else None,
                opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
                dynamic_axes=dynamic_axes or None,
                dynamo=False,
            )
        proto = onnx.load(str(path), load_external_data=True)
    return ir.from_proto(proto)


def _name_dims(model: ir.Model, specs: list[InputSpec]) -> None:
    """Uses the description's dimension names on the ONNX inputs (the exporter's are s0, s1...)."""
    by_name = {s.name: s for s in specs}
    renames: dict[str, str] = {}
    for value in model.graph.inputs:
        spec = by_name.get(value.name or "")
        if spec is None or value.shape is None or len(value.shape) != len(spec.dims):
            continue
        for axis, dim in enumerate(spec.dims):
            current = value.shape[axis]
            if dim.dynamic and isinstance(current, ir.SymbolicDim) and current.value:
                renames[current.value] = dim.name
    if not renames:
        return
    for value in _all_values(model):
        if value.shape is None:
            continue
        new_dims = [
            ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in renames else d
            for d in value.shape
        ]
        value.shape = ir.Shape(new_dims)


def _all_values(model: ir.Model) -> Iterator[ir.Value]:
    graph = model.graph
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


# ---------------------------------------------------------------------------------------------
# Loading a SPEC


def load_torch_spec(spec: str) -> tuple[Any, Any]:
    """The module (or ExportedProgram) and example inputs a SPEC names.

    Args:
        spec: ``package.module:callable``, ``path/file.py:callable`` or ``file.pt2``.

    Returns:
        ``(module, example_inputs or None)``.

    Raises:
        InputError: The callable is missing, returns something else, or the file is unsafe.
    """
    import torch

    if spec.endswith(".pt2") and ":" not in spec:
        return load_pt2(spec), None
    if spec.lower().endswith(_PICKLE_SUFFIXES) and ":" not in spec:
        raise InputError(
            f"{spec}: PyTorch pickle files ({', '.join(_PICKLE_SUFFIXES)}) are not loaded: "
            "unpickling can run code, and weights alone hold no model code. Name a "
            "package.module:callable or path/file.py:callable that builds the module (loading "
            "its weights with torch.load(..., weights_only=True)), or a torch.export .pt2 archive"
            + ("" if Path(spec).is_file() else f" (and {spec} does not exist)")
        )
    factory = load_callable(spec)
    if isinstance(factory, torch.nn.Module):
        return factory, None
    if not callable(factory):
        raise InputError(f"'{spec}' is a {type(factory).__name__}, not a callable")
    if inspect.isclass(factory) and issubclass(factory, torch.nn.Module):
        try:
            made = factory()
        except TypeError as exc:
            raise InputError(f"'{spec}': the class needs arguments ({exc}); name a function that builds it") from exc
        except Exception as exc:  # the user's constructor can raise anything
            raise InputError(f"'{spec}': building the module failed: {type(exc).__name__}: {first_lines(str(exc), 3)}") from exc
    else:
        try:
            made = factory()
        except Exception as exc:  # the user's factory can raise anything
            raise InputError(f"'{spec}': calling it failed: {type(exc).__name__}: {first_lines(str(exc), 3)}") from exc
    example = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example = made
    if not isinstance(made, (torch.nn.Module, torch.export.ExportedProgram)):
        raise InputError(
            f"'{spec}' returned a {type(made).__name__}; expected an nn.Module or "
            "(nn.Module, example_inputs)"
        )
    return made, example


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[None]:
    """Forces ``torch.load`` to ``weights_only=True`` and refuses ``pickle.loads`` meanwhile."""
    import torch
    import torch.export.pt2_archive._package as package

    original_load = torch.load
    original_pickle = package.pickle

    def safe_load(*a: Any, **k: Any) -> Any:
        k["weights_only"] = True
        return original_load(*a, **k)

    class _NoPickle:
        def __getattr__(self, name: str) -> Any:
            if name in ("loads", "load", "Unpickler"):
                raise pickle.UnpicklingError(
                    "the archive holds pickled objects, which onnxpress does not load"
                )
            return getattr(pickle, name)

    torch.load = safe_load
    package.pickle = _NoPickle()
    try:
        yield
    finally:
        torch.load = original_load
        package.pickle = original_pickle


def load_pt2(path: str | Path) -> Any:
    """Loads a ``torch.export.save`` archive with weights-only unpickling."""
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a torch.export archive (a .pt2 file is a zip archive)")
    try:
        # torch logs its own traceback before falling back; the error below says it once.
        with _weights_only_loading(), quiet_framework_logs():
            return torch.export.load(str(path))
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused to load: {first_lines(str(exc), 3)}") from exc
    except Exception as exc:
        raise InputError(f"{path}: not a loadable torch.export archive: {first_lines(str(exc), 3)}") from exc
