"""``onnxpress passes``: every registered pass, its options and needs."""

from __future__ import annotations

import argparse

from onnxpress.options import config_fields, type_name
from onnxpress.passes.registry import available_passes
from onnxpress.recipes import preset_names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "passes",
        help="list the passes with their options and needs",
        description="List every registered pass with its summary, its options (type, default, "
        "meaning) and what it needs, and the shipped presets.",
    )


def run(args: argparse.Namespace) -> int:
    for name, cls in available_passes().items():
        print(f"{name}: {cls.summary()}")
        print(f"  needs: {cls.needs.describe()}")
        fields = config_fields(cls.Config)
        if not fields:
            print("  options: none")
        for field_name, tp, default, help_text in fields:
            print(f"  --set {name}.{field_name}=VALUE  ({type_name(tp)}, default {default!r})")
            print(f"      {help_text}")
        print()
    print("presets: " + ", ".join(preset_names()))
    return 0
