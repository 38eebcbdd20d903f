"""Limits that make reading an untrusted ``.onnxz`` safe: a decompression bomb is refused.

Every size in the manifest is checked against these limits *before* anything is decoded,
and every decoder is capped at the size the manifest declared, so reading a container never
allocates more than :attr:`Limits.max_total_bytes` for tensors. Honest models compress
between 1x and about 10x; a container that claims more than :attr:`Limits.max_ratio` times
its own size is refused unless the caller raises the limit (``--max-ratio`` on the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Limits:
    """What a reader accepts before it decodes anything.

    Attributes:
        max_total_bytes: Most decoded bytes in all (graph plus every tensor).
        max_ratio: Most decoded bytes per byte of the container file. A pruned model
            compresses about 5x; the default leaves room for tensors of zeros.
        max_manifest_bytes: Largest manifest accepted.
        max_tensors: Most tensor entries in one manifest.
    """

    max_total_bytes: int = 64 * GiB
    max_ratio: float = 1000.0
    max_manifest_bytes: int = 64 * MiB
    max_tensors: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_total_bytes <= 0:
            raise ValueError(f"max_total_bytes must be positive, got {self.max_total_bytes}")
        if self.max_ratio <= 0:
            raise ValueError(f"max_ratio must be positive, got {self.max_ratio}")
        if self.max_manifest_bytes <= 0 or self.max_tensors <= 0:
            raise ValueError("max_manifest_bytes and max_tensors must be positive")


DEFAULT_LIMITS = Limits()
