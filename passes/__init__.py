"""Graph passes: node pruning, constant folding, deduplication, and (later) lossy passes."""

from onnxpress.passes.base import Needs, OnnxpressPass, option
from onnxpress.passes.registry import available_passes, get_pass, register

__all__ = ["Needs", "OnnxpressPass", "available_passes", "get_pass", "option", "register"]
