"""Errors that onnxpress raises on purpose, each with the CLI exit status it maps to.

The CLI turns these into one line on stderr and an exit status; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PASS_FAILED = 3
EXIT_VALIDATION_FAILED = 4


class OnnxpressError(Exception):
    """Base class of the errors onnxpress raises deliberately."""

    exit_code: int = EXIT_USAGE


class InputError(OnnxpressError):
    """A bad input: a missing, truncated or non-ONNX file, an unsafe path, bad data."""

    exit_code = EXIT_USAGE


class RecipeError(OnnxpressError):
    """A recipe that names an unknown pass or option, a mistyped value or a missing need."""

    exit_code = EXIT_USAGE


class PassFailedError(OnnxpressError):
    """A pass raised while it ran; names the pass, the passes before it and the node."""

    exit_code = EXIT_PASS_FAILED

    def __init__(
        self,
        pass_name: str,
        previous: list[str],
        message: str,
        node: str | None = None,
    ) -> None:
        where = f" at node {node}" if node else ""
        before = ", ".join(previous) if previous else "none"
        super().__init__(
            f"pass '{pass_name}' failed{where}: {message} (passes run before it: {before})"
        )
        self.pass_name = pass_name
        self.previous = previous
        self.node = node


class NodeError(Exception):
    """Raised inside a pass to say which node it was working on when something broke."""

    def __init__(self, node_desc: str, message: str) -> None:
        super().__init__(message)
        self.node_desc = node_desc


class ValidationFailedError(OnnxpressError):
    """A compressed model missed the fidelity or accuracy tolerance it was held to."""

    exit_code = EXIT_VALIDATION_FAILED
