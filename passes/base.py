"""What every onnxpress pass is: an onnx_ir in-place pass with a typed config and declared needs.

A pass declares, on the class, its registry ``name``, its frozen ``Config`` dataclass (each
field documented through :func:`option`) and its :class:`Needs`; the pipeline reads those to
check a recipe before any work, and the CLI reads them to list the passes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: A calibration batch maps input names to arrays whose first axis is the batch.
CalibrationBatch = Mapping[str, np.ndarray]
#: Progress callback: ``(done, total, message)``.
ProgressCallback = Callable[[int, int, str], None]


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """Declares a config field with its default and its one-line meaning."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EmptyConfig:
    """A pass with no options."""


@dataclass(frozen=True)
class Needs:
    """What a pass needs before it can run.

    Attributes:
        calibration: Batches of real inputs (an iterable of ``{input_name: array}``).
        min_opset: The lowest default-domain opset the model must import.
        calibration_when: For passes whose need depends on options: the options that need
            calibration data, in words, for ``onnxpress passes`` and error messages.
        calibration_if: For those passes: ``config -> bool``, whether this config needs it.
    """

    calibration: bool = False
    min_opset: int | None = None
    calibration_when: str = ""
    calibration_if: Callable[[Any], bool] | None = None

    def describe(self) -> str:
        """A short human description, ``-`` when the pass needs nothing."""
        parts = []
        if self.calibration:
            parts.append("calibration data")
        elif self.calibration_when:
            parts.append(f"calibration data when {self.calibration_when}")
        if self.min_opset is not None:
            parts.append(f"opset >= {self.min_opset}")
        return ", ".join(parts) or "-"


class OnnxpressPass(ir.passes.InPlacePass):
    """Base of every registered pass.

    Subclasses set ``name``, ``Config`` and optionally ``needs``, and implement
    :meth:`call`. The first line of the class docstring is the summary that
    ``onnxpress passes`` prints.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    needs: ClassVar[Needs] = Needs()

    def __init__(
        self,
        config: Any | None = None,
        *,
        calibration: Iterable[CalibrationBatch] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(
                f"pass '{self.name}' takes a {self.Config.__name__}, got {type(self.config).__name__}"
            )
        self.calibration = calibration
        self.progress = progress

    @classmethod
    def needs_for(cls, config: Any) -> Needs:
        """What this pass needs with ``config`` (``needs.calibration_if`` decides for option-dependent needs)."""
        if cls.needs.calibration_if is None:
            return cls.needs
        return dataclasses.replace(cls.needs, calibration=cls.needs.calibration_if(config))

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def requires(self, model: ir.Model) -> None:
        """Checks the declared needs against the model (onnx_ir calls this before ``call``)."""
        needs = self.needs_for(self.config)
        if needs.min_opset is not None:
            opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
            if opset < needs.min_opset:
                raise ir.passes.PreconditionError(
                    f"pass '{self.name}' needs opset >= {needs.min_opset}, "
                    f"the model imports opset {opset}"
                )
        if needs.calibration and self.calibration is None:
            raise ir.passes.PreconditionError(f"pass '{self.name}' needs calibration data")

    def _report(self, done: int, total: int, message: str) -> None:
        if self.progress is not None:
            self.progress(done, total, message)
