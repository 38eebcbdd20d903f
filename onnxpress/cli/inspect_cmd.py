"""``onnxpress inspect MODEL``: what a model holds."""

from __future__ import annotations

import argparse
import json

from onnxpress.inspect import summarize
from onnxpress.model_io import load_model
from onnxpress.report import format_table, human_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's inputs, outputs, opsets, ops, constants and external data",
        description="Show a model's inputs and outputs (shapes, dtypes), opsets, nodes by op "
        "type, constants by dtype with bytes, subgraphs, functions and external data.",
    )
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _shape(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def run(args: argparse.Namespace) -> int:
    info = summarize(load_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {args.model}")
    print(f"ir_version {info['ir_version']}, producer {info['producer'] or '-'}")
    print("opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        print(f"\n{kind}:")
        rows = [["name", "dtype", "shape"]]
        rows += [[v["name"] or "", v["dtype"] or "?", _shape(v["shape"])] for v in info[kind]]
        print(format_table(rows))
    print(f"\nnodes: {info['nodes']} (subgraphs: {len(info['subgraphs'])}, functions: {len(info['functions'])})")
    rows = [["op type", "count"]] + [[op, str(n)] for op, n in info["op_histogram"].items()]
    print(format_table(rows))
    for sub in info["subgraphs"]:
        print(f"  subgraph {sub['node']}.{sub['attribute']}: {sub['nodes']} nodes")
    for function in info["functions"]:
        print(f"  function {function}")
    print(f"\nconstants: {human_bytes(info['constant_bytes'])}")
    rows = [["dtype", "count", "bytes"]]
    rows += [[d, str(e["count"]), human_bytes(e["bytes"])] for d, e in info["constants"].items()]
    print(format_table(rows))
    if info["external_data"]:
        print("\nexternal data:")
        for location, nbytes in info["external_data"].items():
            print(f"  {location}: {human_bytes(nbytes)}")
    else:
        print("\nexternal data: none")
    return 0
