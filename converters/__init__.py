"""Converters: PyTorch and TensorFlow/Keras models to ONNX, each export checked for fidelity.

``from_torch``, ``from_keras`` and ``from_tf`` return a
:class:`~onnxpress.converters.result.ConversionResult` that unpacks as
``model, fidelity = from_torch(...)``. Frameworks are imported only when a converter runs,
and the other names on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxpress.lazy import exports

if TYPE_CHECKING:
    from onnxpress.converters.fidelity import FidelityRecord, OutputFidelity, check_fidelity
    from onnxpress.converters.result import ConversionError, ConversionResult
    from onnxpress.converters.specs import InputSpec, parse_inputs

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "ConversionError": "onnxpress.converters.result",
    "ConversionResult": "onnxpress.converters.result",
    "FidelityRecord": "onnxpress.converters.fidelity",
    "InputSpec": "onnxpress.converters.specs",
    "OutputFidelity": "onnxpress.converters.fidelity",
    "check_fidelity": "onnxpress.converters.fidelity",
    "parse_inputs": "onnxpress.converters.specs",
}
__getattr__, __dir__ = exports(__name__, _EXPORTS)

__all__ = [
    "ConversionError",
    "ConversionResult",
    "FidelityRecord",
    "InputSpec",
    "OutputFidelity",
    "check_fidelity",
    "from_keras",
    "from_tf",
    "from_torch",
    "parse_inputs",
]


def from_torch(*args: Any, **kwargs: Any) -> ConversionResult:
    """See :func:`onnxpress.converters.torch_export.from_torch`."""
    from onnxpress.converters.torch_export import from_torch as _from_torch

    return _from_torch(*args, **kwargs)


def from_keras(*args: Any, **kwargs: Any) -> ConversionResult:
    """See :func:`onnxpress.converters.tf_export.from_keras`."""
    from onnxpress.converters.tf_export import from_keras as _from_keras

    return _from_keras(*args, **kwargs)


def from_tf(*args: Any, **kwargs: Any) -> ConversionResult:
    """See :func:`onnxpress.converters.tf_export.from_tf`."""
    from onnxpress.converters.tf_export import from_tf as _from_tf

    return _from_tf(*args, **kwargs)
