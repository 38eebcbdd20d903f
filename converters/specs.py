"""Input descriptions (``NAME:SHAPE:DTYPE``), example data, and loading user callables.

An input description names one model input, its shape and its element type::

    input_ids:Bx128:int64          # batch dynamic, 128 fixed
    attention_mask:Bxseq:int64     # batch and seq dynamic (seq shared with input_ids)
    image:1x3x32x32:float32        # the first (batch) dimension is dynamic by default
    tokens:Bxseq=64:int64:0..30522 # example size 64 for seq; values drawn from [0, 30522)

A dimension written with letters is dynamic; the same letters in two inputs are the same
dimension (separate dimensions with commas instead of ``x`` when a name contains an ``x``:
``tokens:batch,max_len:int64``). The first dimension is the batch dimension and is dynamic even when written as a
number, unless ``static_batch`` is asked for. ``NAME=SIZE`` gives a dynamic dimension the size
its example data has (default :data:`DEFAULT_DYNAMIC_SIZE`). The optional fourth field
``LOW..HIGH`` bounds generated integer values (default ``0..10``; inputs whose name contains
``mask`` get all ones with a random run of trailing zeros, like padded token masks).

Example data is generated with a fixed seed so two runs check the same numbers.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.errors import InputError

logger = logging.getLogger(__name__)

#: Example size of a dynamic dimension (other than batch) with no ``=SIZE``.
DEFAULT_DYNAMIC_SIZE = 16
#: Name given to the batch dimension when it is written as a number.
BATCH_DIM_NAME = "batch"
#: Seed for generated example inputs.
DEFAULT_SEED = 0

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}
_DTYPE_ALIASES = {
    "float": "float32", "f32": "float32", "fp32": "float32", "double": "float64",
    "f64": "float64", "half": "float16", "fp16": "float16", "f16": "float16",
    "long": "int64", "i64": "int64", "int": "int32", "i32": "int32", "u8": "uint8",
    "i8": "int8",
}
_DIM_RE = re.compile(r"^(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)(?:=(\d+))?)$")


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension: a fixed size, or a named dynamic dimension with an example size."""

    size: int
    name: str | None = None
    #: Whether the size was written (``seq=64``) rather than defaulted.
    explicit: bool = dataclasses.field(default=True, compare=False)

    @property
    def dynamic(self) -> bool:
        return self.name is not None

    def __str__(self) -> str:
        return self.name if self.name else str(self.size)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: its name, dimensions and dtype, and the range of generated values."""

    name: str
    dims: tuple[Dim, ...]
    dtype: np.dtype
    low: int | None = None
    high: int | None = None

    @classmethod
    def parse(cls, text: str, *, static_batch: bool = False) -> InputSpec:
        """Parses ``NAME:SHAPE:DTYPE[:LOW..HIGH]``.

        Raises:
            InputError: The description is malformed; the message shows the expected form.
        """
        form = "expected NAME:SHAPE:DTYPE such as input_ids:Bx128:int64"
        parts = text.split(":")
        if len(parts) not in (3, 4) or not all(parts[:3]):
            raise InputError(f"--input '{text}': {form}")
        name, shape, dtype_name = parts[:3]
        dtype_key = _DTYPE_ALIASES.get(dtype_name.lower(), dtype_name.lower())
        if dtype_key not in _DTYPES:
            raise InputError(
                f"--input '{text}': unknown dtype '{dtype_name}'; "
                f"expected one of {', '.join(_DTYPES)}"
            )
        dims: list[Dim] = []
        if shape not in ("scalar", "()"):
            tokens = shape.split(",") if "," in shape else shape.split("x")
            for index, token in enumerate(t.strip() for t in tokens):
                match = _DIM_RE.match(token)
                if not match:
                    raise InputError(
                        f"--input '{text}': dimension '{token}' is neither a size nor a name "
                        "(write sizes as 128, dynamic dimensions as B or seq or seq=64)"
                    )
                number, dim_name, example = match.groups()
                if number is not None:
                    size = int(number)
                    if size <= 0:
                        raise InputError(f"--input '{text}': dimension sizes must be positive")
                    if index == 0 and not static_batch:
                        dims.append(Dim(size, BATCH_DIM_NAME))
                    else:
                        dims.append(Dim(size))
                else:
                    default = 2 if index == 0 else DEFAULT_DYNAMIC_SIZE
                    dims.append(Dim(int(example) if example else default, dim_name, bool(example)))
        low = high = None
        if len(parts) == 4:
            bounds = re.match(r"^(-?\d+)\.\.(-?\d+)$", parts[3])
            if not bounds or int(bounds.group(1)) >= int(bounds.group(2)):
                raise InputError(
                    f"--input '{text}': value range '{parts[3]}' should be LOW..HIGH with LOW < HIGH"
                )
            low, high = int(bounds.group(1)), int(bounds.group(2))
        return cls(name, tuple(dims), _DTYPES[dtype_key], low, high)

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.dims) and self.dims[0].dynamic

    def shape(self, batch: int | None = None, *, vary: bool = False) -> tuple[int, ...]:
        """The example shape, with the batch dimension set to ``batch`` when it is dynamic.

        ``vary`` shrinks the other dynamic dimensions by a quarter (sizes of 4 and up), so a
        check at two batch sizes also runs two sizes of every dynamic dimension.
        """
        sizes = [d.size for d in self.dims]
        if vary:
            sizes = [
                s - s // 4 if d.dynamic and i > 0 and s >= 4 else s
                for i, (s, d) in enumerate(zip(sizes, self.dims, strict=True))
            ]
        if batch is not None and self.batch_dynamic:
            sizes[0] = batch
        return tuple(sizes)

    def onnx_shape(self) -> list[int | str]:
        """The shape as ONNX writes it: numbers and symbolic names."""
        return [d.name if d.dynamic else d.size for d in self.dims]

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(str(d) for d in self.dims) or 'scalar'}:{self.dtype.name}"


def parse_inputs(texts: Sequence[str], *, static_batch: bool = False) -> list[InputSpec]:
    """Parses every ``--input`` and checks names are unique and shared dims agree."""
    specs = [InputSpec.parse(t, static_batch=static_batch) for t in texts]
    # A dimension sized in one input (seq=64) has that size wherever it is named.
    written = {d.name: d.size for s in specs for d in s.dims if d.dynamic and d.explicit}
    specs = [
        dataclasses.replace(s, dims=tuple(
            Dim(written[d.name], d.name, True) if d.dynamic and not d.explicit and d.name in written else d
            for d in s.dims
        ))
        for s in specs
    ]
    seen: set[str] = set()
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name in seen:
            raise InputError(f"--input '{spec.name}' is given twice")
        seen.add(spec.name)
        for dim in spec.dims[1:]:
            if dim.dynamic and sizes.setdefault(dim.name, dim.size) != dim.size:
                raise InputError(
                    f"--input '{spec.name}': dimension '{dim.name}' has example size {dim.size} "
                    f"here but {sizes[dim.name]} in another input"
                )
    return specs


def generate_inputs(
    specs: Sequence[InputSpec], batch: int | None, seed: int = DEFAULT_SEED, *, vary: bool = False
) -> dict[str, np.ndarray]:
    """Example inputs for the descriptions, reproducible from ``seed``.

    ``vary`` shrinks the non-batch dynamic dimensions (see :meth:`InputSpec.shape`).

    Floats are standard normal; integers uniform in ``[low, high)`` (default ``[0, 10)``);
    booleans fair coins; inputs named like ``*mask*`` are ones with random trailing zeros.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.shape(batch, vary=vary)
        if spec.dtype == np.bool_:
            value = rng.random(shape) > 0.5
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in spec.name.lower() and spec.low is None and len(shape) >= 1:
                value = _padding_mask(shape, rng).astype(spec.dtype)
            else:
                low = 0 if spec.low is None else spec.low
                high = 10 if spec.high is None else spec.high
                value = rng.integers(low, high, size=shape).astype(spec.dtype)
        else:
            value = rng.standard_normal(shape).astype(spec.dtype)
        feeds[spec.name] = value
    return feeds


def check_batch_sizes(specs: Sequence[InputSpec], wanted: Sequence[int]) -> list[int]:
    """The batch sizes a check can run.

    ``wanted`` when any input has a dynamic batch, else the inputs' one fixed batch size (1
    when they are all scalars).
    """
    if any(s.batch_dynamic for s in specs):
        return list(wanted)
    return [next((s.shape()[0] for s in specs if s.dims), 1)]


def _padding_mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Ones with a random number of trailing zeros per row (at least one one per row)."""
    mask = np.ones(shape, dtype=np.int64)
    if len(shape) < 2:
        return mask
    rows = mask.reshape(-1, shape[-1])
    for row in rows:
        keep = int(rng.integers(1, shape[-1] + 1))
        row[keep:] = 0
    return rows.reshape(shape)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Reads inputs from an ``.npz`` file without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"--data {path}: not a readable .npz of arrays: {exc}") from exc


def batches_from_data(
    data: Mapping[str, np.ndarray], batch_sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Slices the first rows of every array for each batch size (capped at the rows there are)."""
    rows = min(len(v) for v in data.values()) if data else 0
    if rows == 0:
        raise InputError("the input data has no rows")
    out = []
    for size in sorted({min(b, rows) for b in batch_sizes}):
        out.append({k: np.ascontiguousarray(v[:size]) for k, v in data.items()})
    return out


def load_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Finds ``package.module:callable`` or ``path/file.py:callable``.

    A ``.py`` path is imported as a module (its folder is put on ``sys.path`` meanwhile, so
    it can import its neighbours). The code runs: only name files you trust.

    Raises:
        InputError: The module or file cannot be imported, or has no such callable; the
            message lists the callables it does have.
    """
    if ":" not in spec:
        raise InputError(
            f"'{spec}': expected package.module:callable or path/file.py:callable"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise InputError(f"'{spec}': expected package.module:callable or path/file.py:callable")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise InputError(f"'{spec}': no such file {path}")
        module_name = f"_onnxpress_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"'{spec}': cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise InputError(f"'{spec}': importing {path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if sys.path and sys.path[0] == folder:
                sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"'{spec}': cannot import module '{target}': {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            available = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise InputError(
                f"'{spec}': '{target}' has no {what} '{attr}'"
                + (f"; it has: {', '.join(available)}" if available else "")
            )
        obj = getattr(obj, part)
    return obj
