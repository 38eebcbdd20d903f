"""Pruning benchmark: the issue's three targets, post-training, measured through the validator.

1. digits CNN, 80 % unstructured sparsity over all Conv/Gemm weights, accuracy drop <= 1 point;
2. digits CNN, 30 % of the conv channels removed, accuracy drop <= 1 point, and the batch
   throughput gain (onnxruntime, median of timed runs, both models interleaved);
3. MiniLM-L6, 50 % unstructured sparsity in the encoder's MatMuls, mean cosine >= 0.98 on
   held-out sentences.

Every row prunes the original model with one configuration (no retraining) and validates it
with :func:`onnxpress.runtime.validate` against the original; the table prints the target, the
measured value and whether it is met. Calibration data is never the evaluation data: the
digits rows calibrate on ``digits_calib.npz`` (training samples) and evaluate on the test
split; MiniLM calibrates on 768 stdlib-docstring sentences (or, with ``--calib-sentences N``, on
N sentences from the rest of the standard library's docstrings, none of them in the sample pool;
``--calib-with-stdlib`` adds the 768) and
evaluates on 256 other stdlib sentences.

``--allocate`` adds a MiniLM row (label "... from sensitivity ...") whose per-layer sparsities come from
:func:`onnxpress.sensitivity.analyze` with ``target=0.5`` (each MatMul pruned alone at 30, 50 and 70 %
with SparseGPT, drops measured on 300 calibration sentences, Hessians from 1 000 others; needs
``--calib-sentences`` of at least 1 300) instead of the attention-output pins.

Run: ``python benchmarks/prune_bench.py [--skip-minilm | --skip-digits] [--minilm-only TEXT ...]
[--calib-sentences N [--calib-with-stdlib]] [--allocate] [--threads N]
[--json OUT] [--save-dir DIR]``,
then ``python benchmarks/prune_throughput.py DIR/digits_*.onnx`` on a quiet machine.
Throughput on a shared machine is noisy: rerun before quoting it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from onnxpress.passes.registry import get_pass
from onnxpress.runtime import Tolerances, validate

from onnxpress.model_io import load_model, save_model
from onnxpress.report import format_table

logger = logging.getLogger("prune_bench")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _prune(source: Path, target: Path, pass_name: str, options: dict[str, Any], calibration) -> tuple[dict, float]:
    pass_cls = get_pass(pass_name)
    model = load_model(source)
    instance = pass_cls(pass_cls.Config(**options), calibration=calibration)
    start = time.perf_counter()
    instance(model)
    seconds = time.perf_counter() - start
    save_model(model, target, force=True)
    return instance.details, seconds


def _validate(reference: Path, candidate: Path, data, *, speed: bool, batch_size: int, threads: int | None):
    return validate(
        reference, candidate, data=data, batch_size=batch_size, measure_speed=speed, threads=threads,
        speed_repeats=15, tolerances=Tolerances(min_cosine=None, max_accuracy_drop=None),
    )


def conv_channels(path: Path) -> int:
    """Output channels of all Conv nodes of a model."""
    model = load_model(path)
    return sum(
        node.inputs[1].const_value.shape[0] for node in model.graph if node.op_type == "Conv"
    )


def digits_rows(workdir: Path, threads: int | None) -> list[dict[str, Any]]:
    from onnxpress.models.digits import (
        digits_cnn_path,
        load_digits_calib,
        load_digits_test,
    )

    source = digits_cnn_path()
    images, labels = load_digits_test()
    data = {"image": images, "label": labels}
    calib = load_digits_calib()
    calibration = [{"image": calib[i : i + 64]} for i in range(0, len(calib), 64)]
    rows = []
    magnitude = [
        ("global magnitude", {"sparsity": 0.8, "scope": "global", "min_elements": 0}),
        ("global magnitude + bias correction", {"sparsity": 0.8, "scope": "global", "min_elements": 0, "bias_correction": True}),
    ]
    for label, options in magnitude:
        target = workdir / f"digits_{_slug(label)}.onnx"
        details, seconds = _prune(source, target, "prune-magnitude", options, calibration)
        report = _validate(source, target, data, speed=False, batch_size=256, threads=threads)
        drop = report.accuracy_drop
        rows.append({
            "model": "digits CNN", "pass": "prune-magnitude", "config": label, "options": options,
            "result": f"sparsity {details['sparsity_all_weights']:.3f} of all weights",
            "metric": f"acc {report.reference.accuracy:.2f} -> {report.candidate.accuracy:.2f} ({-drop:+.2f} pts)",
            "target": "80 % sparse, drop <= 1 pt",
            "met": details["sparsity_all_weights"] >= 0.8 - 1e-6 and drop <= 1.0,
            "seconds": seconds,
        })
    channels = [
        ("conv channels, l1, no compensation", {"ratio": 0.3, "ops": ["Conv"], "criterion": "l1"}),
        ("conv channels, activation + bias", {"ratio": 0.3, "ops": ["Conv"], "criterion": "activation", "compensation": "bias"}),
        ("conv channels, activation + weights", {"ratio": 0.3, "ops": ["Conv"], "criterion": "activation", "compensation": "weights"}),
        ("conv channels, 16-wide, activation + weights", {"ratio": 0.3, "ops": ["Conv"], "round_to": 16, "criterion": "activation", "compensation": "weights"}),
    ]
    for label, options in channels:
        target = workdir / f"digits_{_slug(label)}.onnx"
        options = dict(options, ops=tuple(options.get("ops", ("Conv", "Gemm", "MatMul"))))
        details, seconds = _prune(source, target, "prune-channels", options, calibration)
        report = _validate(source, target, data, speed=True, batch_size=256, threads=threads)
        before = conv_channels(source)
        removed = before - conv_channels(target)
        drop = report.accuracy_drop
        rows.append({
            "model": "digits CNN", "pass": "prune-channels", "config": label,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "result": f"{removed}/{before} conv channels ({removed / before:.0%}), MACs x{details['macs_after'] / details['macs_before']:.2f}, "
                      f"batch-256 speed x{report.speedup:.2f}",
            "metric": f"acc {report.reference.accuracy:.2f} -> {report.candidate.accuracy:.2f} ({-drop:+.2f} pts)",
            "target": "30 % conv channels, drop <= 1 pt",
            "met": removed / before >= 0.3 - 1e-6 and drop <= 1.0,
            "seconds": seconds,
            "speedup": report.speedup,
            "samples_per_second": [report.reference.samples_per_second, report.candidate.samples_per_second],
        })
    return rows


def _length_buckets(tokenize, sentences: list[str], batch: int) -> list[dict[str, np.ndarray]]:
    """Calibration batches of sentences of equal token length: no padding in the statistics."""
    buckets: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    padded = tokenize(sentences)  # one tokenizer load; rows are cut back to their own length
    for row, length in enumerate(padded["attention_mask"].sum(axis=1)):
        buckets[int(length)].append({k: v[row : row + 1, :length] for k, v in padded.items()})
    batches = []
    for _, group in sorted(buckets.items()):
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            batches.append({k: np.concatenate([c[k] for c in chunk]) for k in chunk[0]})
    return batches


def _minilm_pins(source: Path) -> tuple[str, ...]:
    """``per_layer`` pins: attention output projections at 35 %, Q/K/V and FFN input at 50 %.

    The FFN output projections stay unpinned and take the rest of the 50 % budget (about 54 %).
    The exporter names weights ``val_N``, so the layers are told apart by what feeds them: the
    attention output reads a ``Reshape`` of the heads, the FFN output reads the ``Gelu``.
    """
    model = load_model(source)
    pins = []
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if weight is None or weight.const_value is None:
            continue
        producer = node.inputs[0].producer()
        kind = producer.op_type if producer is not None else ""
        if kind == "Reshape":
            pins.append(f"{weight.name}=0.35")
        elif kind != "Gelu":
            pins.append(f"{weight.name}=0.5")
    return tuple(pins)


def _sensitivity_levels(source: Path, tokenize: Any, sentences: list[str]) -> tuple[str, ...]:
    """``per_layer`` levels reaching 50 % of the MatMul weights with the least summed drop.

    Each MatMul is pruned alone at 30, 50 and 70 % (SparseGPT per row with ``refit_kept``, Hessians
    from the first 1 000 of ``sentences``) and compared with the original on the last 300;
    :func:`onnxpress.sensitivity.allocate` then spends the budget where it costs least.
    """
    from onnxpress.sensitivity import analyze

    if len(sentences) < 1300:
        raise SystemExit("--allocate needs --calib-sentences 1300 or more (1 000 for Hessians, 300 to score)")
    calibration = _length_buckets(tokenize, sentences[:1000], 32)
    started = time.perf_counter()

    def progress(done: int, total: int, message: str) -> None:
        if done % 20 == 0 or done == total:
            logger.info("sensitivity %d/%d (%s), %.0f s", done, total, message, time.perf_counter() - started)

    report = analyze(
        source, tokenize(sentences[-300:]), method="prune-magnitude", levels=(0.3, 0.5, 0.7),
        options={"scope": "per-layer", "score": "sparsegpt", "granularity": "row", "refit_kept": True,
                 "damping": 0.002, "ops": ["MatMul"], "calibration_batches": len(calibration)},
        calibration=calibration, batch_size=64, target=0.5, progress=progress,
    )
    logger.info("%s", report.table())
    return tuple(report.per_layer())


def minilm_rows(
    workdir: Path,
    threads: int | None,
    only: list[str] | None = None,
    calib_sentences: int | None = None,
    calib_with_stdlib: bool = False,
    allocate: bool = False,
) -> list[dict[str, Any]]:
    from onnxpress.models.minilm import (
        build_minilm_onnx,
        calibration_sentences,
        sample_sentences,
        tokenize,
    )

    source = build_minilm_onnx()
    sentences = sample_sentences(1024, seed=0)
    data = tokenize(sentences[:256])
    if calib_sentences is None:
        calib_text, calib_label = sentences[256:], "768 stdlib"
    else:  # other docstrings: none of them in the sample pool, so none an evaluation sentence
        calib_text, calib_label = calibration_sentences(calib_sentences, seed=0), f"{calib_sentences} more"
        if calib_with_stdlib:
            calib_text, calib_label = sentences[256:] + calib_text, f"768 stdlib + {calib_sentences} more"
    calibration = _length_buckets(tokenize, calib_text, 32)
    logger.info(
        "MiniLM: calibration on %s sentences (%d tokens), evaluation on 256 stdlib sentences",
        calib_label, sum(b["input_ids"].size for b in calibration),
    )
    rows = []
    configs = [
        ("magnitude, per layer", {"sparsity": 0.5, "scope": "per-layer"}),
        ("Wanda |W|*||X||, per row", {"sparsity": 0.5, "scope": "per-layer", "score": "activation", "granularity": "row"}),
        ("SparseGPT, per row", {"sparsity": 0.5, "scope": "per-layer", "score": "sparsegpt", "granularity": "row"}),
        ("SparseGPT, per row, sequential", {"sparsity": 0.5, "scope": "per-layer", "score": "sparsegpt", "granularity": "row", "sequential": True}),
        ("SparseGPT, per row, sequential, refit_bias, damping 0.002, attention output 35 %, FFN output 54 %",
         {"sparsity": 0.5, "scope": "per-layer", "score": "sparsegpt", "granularity": "row", "sequential": True,
          "refit_bias": True, "damping": 0.002, "per_layer": _minilm_pins(source)}),
        ("SparseGPT, per row, sequential, refit_bias, refit_kept, damping 0.002, attention output 35 %, FFN output 54 %",
         {"sparsity": 0.5, "scope": "per-layer", "score": "sparsegpt", "granularity": "row", "sequential": True,
          "refit_bias": True, "refit_kept": True, "damping": 0.002, "per_layer": _minilm_pins(source)}),
    ]
    if allocate:  # its per_layer levels are measured when the row runs
        configs.append(
            ("SparseGPT, per row, sequential, refit_bias, refit_kept, damping 0.002, per-layer levels from sensitivity --target 0.5",
             {"sparsity": 0.5, "scope": "per-layer", "score": "sparsegpt", "granularity": "row", "sequential": True,
              "refit_bias": True, "refit_kept": True, "damping": 0.002, "per_layer": None}))
    if only:
        configs = [(label, options) for label, options in configs if any(o in label for o in only)]
    for label, options in configs:
        if "per_layer" in options and options["per_layer"] is None:
            levels = _sensitivity_levels(source, tokenize, calibration_sentences(calib_sentences or 0, seed=0))
            options = dict(options, per_layer=levels)
        options = dict(options, calibration_batches=len(calibration), ops=("MatMul",))
        target = workdir / f"minilm_{_slug(label)}.onnx"
        details, seconds = _prune(source, target, "prune-magnitude", options, calibration)
        report = _validate(source, target, data, speed=False, batch_size=64, threads=threads)
        cosine = report.outputs["sentence_embedding"].mean_cosine
        rows.append({
            "model": "MiniLM-L6", "pass": "prune-magnitude", "config": f"{label} [calib: {calib_label}]",
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "result": f"sparsity {details['sparsity']:.3f} of {len(details['tensors'])} MatMul weights",
            "metric": f"mean cos {cosine:.4f} (min {report.outputs['sentence_embedding'].min_cosine:.4f})",
            "target": "50 % sparse, mean cos >= 0.98",
            "met": details["sparsity"] >= 0.5 - 1e-6 and cosine >= 0.98,
            "seconds": seconds,
        })
        logger.info("%s: %s", label, rows[-1]["metric"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true", help="only the digits rows (MiniLM takes minutes)")
    parser.add_argument("--skip-digits", action="store_true", help="only the MiniLM rows")
    parser.add_argument(
        "--minilm-only", nargs="+", metavar="TEXT",
        help="only the MiniLM rows whose label contains one of these texts (sequential SparseGPT takes ~10 min a row)",
    )
    parser.add_argument(
        "--calib-sentences", type=int, default=None, metavar="N",
        help="calibrate MiniLM on N sentences from other docstrings (the rest of the standard library "
             "first, then installed packages: onnxpress.models.minilm.calibration_sentences) instead of "
             "the 768 sample ones; evaluation stays on the 256 held-out sample sentences",
    )
    parser.add_argument(
        "--calib-with-stdlib", action="store_true",
        help="with --calib-sentences: calibrate on the 768 sample sentences and the N others together",
    )
    parser.add_argument(
        "--allocate", action="store_true",
        help="add a MiniLM row with per-layer sparsities chosen by sensitivity --target 0.5 (~30 min more)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for timing")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--save-dir", help="keep the pruned models here (for prune_throughput.py)")
    args = parser.parse_args()
    if args.allocate and (args.calib_sentences or 0) < 1300:
        parser.error("--allocate needs --calib-sentences 1300 or more (1 000 for Hessians, 300 to score)")
    if args.calib_with_stdlib and args.calib_sentences is None:
        parser.error("--calib-with-stdlib adds the 768 sample sentences to --calib-sentences N: give N")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnxpress").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        workdir = Path(args.save_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [] if args.skip_digits else digits_rows(workdir, args.threads)
        if not args.skip_minilm:
            rows += minilm_rows(workdir, args.threads, args.minilm_only, args.calib_sentences, args.calib_with_stdlib,
                                args.allocate)
    table = [["model", "pass", "configuration", "result", "quality", "target", "met", "pass s"]]
    for r in rows:
        table.append([r["model"], r["pass"], r["config"], r["result"], r["metric"], r["target"],
                      "yes" if r["met"] else "NO", f"{r['seconds']:.1f}"])
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
