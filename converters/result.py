"""What a conversion returns, the error for an op no exporter converts, and shared helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxpress.converters.fidelity import FidelityRecord, Reference, check_fidelity

from onnxpress.errors import EXIT_PASS_FAILED, OnnxpressError
from onnxpress.model_io import (
    EXTERNAL_DATA_THRESHOLD_BYTES,
    EXTERNAL_TENSOR_MIN_BYTES,
    constant_bytes,
)

logger = logging.getLogger(__name__)


class ConversionError(OnnxpressError):
    """No exporter could convert the model; names the op when the exporter said which.

    Exit status 3, like a failed pass: the input was readable but a step could not be done.
    """

    exit_code = EXIT_PASS_FAILED

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


@dataclasses.dataclass
class ConversionResult:
    """An exported model, its fidelity record, and how it was made.

    Unpacks as ``model, fidelity = from_torch(...)``.
    """

    model: ir.Model
    fidelity: FidelityRecord
    exporter: str
    exporter_note: str
    opset: int
    seconds: float
    inputs: list[str]
    outputs: list[str]

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.fidelity

    def to_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "exporter_note": self.exporter_note,
            "opset": self.opset,
            "seconds": round(self.seconds, 3),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "fidelity": self.fidelity.to_dict(),
        }


def model_opset(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return int(model.opset_imports.get("", 0))


def describe_value(value: ir.Value) -> str:
    """``name:d0xd1:dtype`` of a graph input or output."""
    shape = ("x".join(str(d) for d in value.shape) or "scalar") if value.shape is not None else "?"
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    return f"{value.name}:{shape}:{dtype}"


@contextlib.contextmanager
def saved_for_session(model: ir.Model) -> Iterator[Path]:
    """Saves the model into a temporary folder (external data when large) for onnxruntime.

    Going through a file, not ``SerializeToString``, keeps models over 2 GB working.
    """
    from onnxpress.model_io import _save_inlined

    with tempfile.TemporaryDirectory(prefix="onnxpress-convert-") as tmp:
        path = Path(tmp) / "model.onnx"
        if constant_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            ir.save(model, path, external_data="model.onnx.data",
                    size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES)
        else:
            _save_inlined(model, path)
        yield path


def check_export(
    model: ir.Model, reference: Reference, batches: Sequence[Mapping[str, np.ndarray]], **options: Any
) -> tuple[FidelityRecord, list[list[int]]]:
    """Runs the export in onnxruntime against the framework (:func:`check_fidelity`).

    Args:
        model: The export.
        reference: The framework model, as :func:`check_fidelity` takes it.
        batches: Named inputs, one mapping per batch size.
        **options: ``check_fidelity``'s keyword options (tolerances, ``inputs``, ``progress``).

    Returns:
        The record, and the output shapes seen at the largest batch (for ``fix_output_shapes``).
    """
    from onnxpress.sessions import load_session

    with saved_for_session(model) as path:
        session = load_session(path)
        record = check_fidelity(reference, session, batches, **options)
        del session
    largest = max(record.batch_sizes, default=0)
    return record, [list(o.shape) for o in record.outputs if o.batch_size == largest]


@contextlib.contextmanager
def captured_fds(label: str) -> Iterator[None]:
    """Captures what native code writes to file descriptors 1 and 2 (the debug log gets it).

    The TorchScript exporter prints its IR from C++ when it fails, below Python's
    ``sys.stdout``; only swapping the descriptors keeps that off the terminal.
    """
    import os
    import sys

    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                logger.debug("%s wrote:\n%s", label, text[-4000:])


@contextlib.contextmanager
def captured_stdout(label: str) -> Iterator[io.StringIO]:
    """Sends what an exporter prints to the debug log instead of the user's terminal."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug("%s printed:\n%s", label, text)


@contextlib.contextmanager
def quiet_framework_logs() -> Iterator[None]:
    """Keeps exporters' Python warnings and chatty loggers out of the user's terminal.

    Warnings go to the debug log; the framework loggers are silenced meanwhile.
    """
    # tf2onnx is left out: its errors name unconvertible ops and are collected by tf_export.
    prefixes = ("torch", "onnxscript", "tensorflow", "absl")
    # torch's loggers have their own handlers and levels (propagate=False), so raising the
    # parent's level does not reach them; disabling each one does.
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.split(".")[0] in prefixes
    ]
    saved = [(lg, lg.disabled) for lg in loggers]
    # Loggers created during the export are not in the list yet; logging.disable covers them
    # (WARNING and below, so real errors elsewhere still show).
    previous_disable = logging.root.manager.disable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lg in loggers:
            lg.disabled = True
        logging.disable(logging.WARNING)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                yield
        finally:
            logging.disable(previous_disable)
            for lg, disabled in saved:
                lg.disabled = disabled
            for warning in caught:
                logger.debug("exporter warning: %s", warning.message)
            if stderr.getvalue().strip():
                logger.debug("exporter wrote to stderr:\n%s", stderr.getvalue().strip())


def default_output_names(count: int) -> list[str]:
    """``output`` for one output, ``output_0``, ``output_1``... for several."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def fix_output_shapes(model: ir.Model, observed: list[list[int]]) -> None:
    """Makes output dims symbolic where the exporter declared a size the check did not see.

    Exporters sometimes declare a dynamic dimension of an output with the example's size
    (torch's LSTM does for the sequence axis); onnxruntime then warns on every run.
    """
    for value, shape in zip(model.graph.outputs, observed, strict=False):
        if value.shape is None or len(value.shape) != len(shape):
            continue
        dims = list(value.shape)
        changed = False
        for axis, (declared, seen) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(declared, int) and declared != seen:
                dims[axis] = ir.SymbolicDim(f"{value.name}_dim{axis}")
                changed = True
        if changed:
            logger.info("Output '%s' declared shape %s; made the varying dims symbolic", value.name, value.shape)
            value.shape = ir.Shape(dims)


_OP_PATTERNS = (
    re.compile(r"Unsupported FX nodes: \{'call_function': \[([^\]]+)\]"),
    re.compile(r"[Uu]nsupported ops?:? .*?Counter\(\{'([^']+)'"),
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"No (?:decompositions?|ONNX function) (?:registered|found) for .*?'?([\w]+::[\w.]+|[\w]+\.[\w]+\.[\w]+)'?"),
    re.compile(r"\b((?!torch\b)[a-z_][\w]*::[\w.]+)"),
    re.compile(r"\btorch\.ops\.([\w]+\.[\w]+)"),
    re.compile(r"Tensorflow op \[[^\]]*: ([\w]+)\] is not supported"),
    re.compile(r"\bop[_ ]type[:= ]+'?([\w]+)"),
)


def find_op_name(message: str) -> str | None:
    """The op an exporter's error message names, if any (torch ops as ``namespace::name``)."""
    overload = re.search(r"OpOverload\(op='(\w+)\.([\w.]+)'", message)
    if overload:
        return f"{overload.group(1)}::{overload.group(2)}"
    for pattern in _OP_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).strip().strip("'\"")
    return None


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (exporters wrap the real error)."""
    if isinstance(exc, OnnxpressError):  # onnxpress's own message already says what failed
        return str(exc).strip().splitlines()[0][:400]
    inner = exc
    seen = {id(inner)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        inner = inner.__cause__
        seen.add(id(inner))
    message = str(inner)
    summary = re.search(r"## Exception summary\s+<class '([\w.]+)'>: ([^\n]+)", message)
    if summary:  # torch.onnx puts the real error in a summary section
        return f"{summary.group(1).rsplit('.', 1)[-1]}: {summary.group(2).strip()[:300]}"
    text = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {text[:300]}"


def first_lines(message: str, limit: int = 12) -> str:
    """The first ``limit`` non-empty lines of a long exporter message."""
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    text = "\n".join(lines[:limit])
    return text + ("\n..." if len(lines) > limit else "")
