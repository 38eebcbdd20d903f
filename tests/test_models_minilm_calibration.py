"""calibration_sentences: third-party docstring sentences, disjoint from the stdlib evaluation pool."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from onnxpress.models import minilm

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def _fake_package(root: Path, stdlib_sentence: str, count: int, word: str = "plain") -> str:
    """A package of two modules whose docstrings hold ``count`` plain sentences and one stdlib one."""
    name = f"fakedocs_{uuid.uuid4().hex[:8]}"
    package = root / name
    (package / "sub").mkdir(parents=True)
    sentences = [
        f"The {word} {WORDS[i % 10]} value reads the {WORDS[(i // 10) % 10]} field of record {WORDS[i // 100]}."
        for i in range(count)
    ]
    half = count // 2
    (package / "__init__.py").write_text(
        f'"""{" ".join(sentences[:half])}\n\n{stdlib_sentence}\n\nToo short here. With 2 digits it is not plain text."""\n'
    )
    body = "\n".join(f'def f{i}():\n    """{s}"""\n' for i, s in enumerate(sentences[half:]))
    (package / "sub" / "mod.py").write_text(f'class C:\n    """{stdlib_sentence}"""\n\n{body}\n')
    (package / "sub" / "broken.py").write_text("def (:\n")  # unparsable files are skipped
    return name


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(tmp_path))
    stdlib_sentence = minilm.sample_sentences(1, seed=3)[0]
    return _fake_package(tmp_path, stdlib_sentence, 60)


def test_sentences_are_plain_distinct_and_not_from_the_stdlib_pool(fake_package: str) -> None:
    got = minilm.calibration_sentences(60, seed=1, packages=("no_such_package_xyz", fake_package))
    assert len(got) == len(set(got)) == 60
    assert not set(got) & set(minilm._sentence_pool())
    assert all(6 <= len(s.split()) <= 30 and s.endswith(".") for s in got)
    assert fake_package not in sys.modules  # read with ast, never imported


def test_draw_is_deterministic_per_seed(fake_package: str) -> None:
    first = minilm.calibration_sentences(20, seed=4, packages=(fake_package,))
    assert first == minilm.calibration_sentences(20, seed=4, packages=(fake_package,))
    assert first != minilm.calibration_sentences(20, seed=5, packages=(fake_package,))
    assert minilm.calibration_sentences(0, packages=(fake_package,)) == []


def test_too_many_or_negative_is_a_clear_error(fake_package: str) -> None:
    with pytest.raises(ValueError, match=rf"asked for 61 .*{fake_package}.* hold only 60"):
        minilm.calibration_sentences(61, packages=(fake_package, "no_such_package_xyz"))
    with pytest.raises(ValueError, match="n must be >= 0"):
        minilm.calibration_sentences(-1)


def test_stdlib_pool_is_unchanged() -> None:
    # the evaluation sentences other code depends on: same filter, same sorted pool
    pool = minilm._sentence_pool()
    assert list(pool) == sorted(set(pool)) and len(pool) > 1000
    order = np.random.default_rng(0).permutation(len(pool))[:3]
    assert minilm.sample_sentences(3, seed=0) == [pool[i] for i in order]


def test_stdlib_source_reads_the_standard_library_folder_but_not_installed_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sysconfig

    stdlib_sentence = minilm.sample_sentences(1, seed=8)[0]
    name = _fake_package(tmp_path / "lib", stdlib_sentence, 40)  # a module folder of the "stdlib"
    installed = _fake_package(tmp_path / "lib" / "site-packages", stdlib_sentence, 30, word="installed")
    paths = dict(sysconfig.get_paths(), stdlib=str(tmp_path / "lib"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *args, **kwargs: paths)
    minilm._package_sentences.cache_clear()
    try:
        got = minilm.calibration_sentences(40, packages=("stdlib",))
        assert stdlib_sentence not in got and len(set(got)) == 40
        with pytest.raises(ValueError, match=r"\['stdlib'\].* hold only 40"):
            minilm.calibration_sentences(41, packages=("stdlib",))  # site-packages is not read
    finally:
        minilm._package_sentences.cache_clear()
    assert name and installed
