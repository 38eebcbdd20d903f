"""The command line: help, inspect, passes, compress, exit statuses and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import assert_bit_identical, parse, python_stdout, run_ort
from onnxpress.cli import COMMANDS, build_parser, main
from onnxpress.models.digits import digits_cnn_path, load_digits_test

TOY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y)
<float[3] w = {1.0, 2.0, 3.0}, float[3] w2 = {1.0, 2.0, 3.0}>
{
  a = Identity(x)
  b = Add(a, w)
  dead = Neg(x)
  y = Mul(b, w2)
}
"""


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy.onnx"
    onnx.save(parse(TOY), str(path))
    return path


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys) -> None:
    names = _subcommands()
    assert {"inspect", "passes", "compress"} <= set(names)
    assert len(names) >= len(COMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert f"usage: onnxpress {name}" in capsys.readouterr().out


def test_python_dash_m_works() -> None:
    result = subprocess.run([sys.executable, "-m", "onnxpress", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compress" in result.stdout


def test_running_packing_and_validating_do_not_import_onnx_ir() -> None:
    """onnx-ir (0.6 s with sympy) is not loaded to parse run, pack, unpack or validate, nor
    to start a session (validate's --localize and --value-map load it when asked)."""
    code = (
        "import sys\n"
        "from onnxpress.cli import build_parser\n"
        "build_parser('run').parse_args(['run', 'm.onnx', '--input', 'd.npz', '--output', 'o'])\n"
        "build_parser('pack').parse_args(['pack', 'm.onnx'])\n"
        "build_parser('unpack').parse_args(['unpack', 'm.onnxz'])\n"
        "build_parser('validate').parse_args(['validate', 'a.onnx', 'b.onnx'])\n"
        "import onnxpress, onnxpress.runtime.runner\n"
        "onnxpress.load_session\n"
        "print(sorted(m for m in ('onnx_ir', 'sympy', 'onnxpress.model_io') if m in sys.modules))\n"
    )
    stdout = python_stdout(code)
    assert stdout.strip() == "[]"


def test_a_subcommand_is_parsed_in_full_when_only_it_is_built(capsys) -> None:
    full = build_parser().parse_args(["pack", "m.onnx", "--level", "3"])
    only = build_parser("pack").parse_args(["pack", "m.onnx", "--level", "3"])
    assert vars(only) == vars(full)
    with pytest.raises(SystemExit):  # the other commands are there by name only
        build_parser("pack").parse_args(["unpack", "m.onnxz", "--max-ratio", "2"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_inspect_lists_interface_ops_and_constants(toy: Path, capsys) -> None:
    assert main(["inspect", str(toy)]) == 0
    out = capsys.readouterr().out
    assert "x     float  [N, 3]" in out
    assert "Identity" in out and "Neg" in out
    assert "float      2   24 B" in out
    assert main(["inspect", "--json", str(toy)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nodes"] == 4 and info["op_histogram"]["Add"] == 1
    assert info["constants"]["float"] == {"count": 2, "bytes": 24}


def test_passes_lists_options_and_needs(capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("prune-dead", "eliminate-noop", "fold-constants", "dedup-constants", "cse"):
        assert f"{name}: " in out
    assert "--set fold-constants.size_budget_bytes=VALUE  (int, default 1048576)" in out
    assert "presets: " in out and "lossless" in out


def test_compress_bundled_model_with_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "digits.onnx"
    report = tmp_path / "report.json"
    code = main(["compress", str(digits_cnn_path()), "-o", str(out), "--preset", "lossless",
                 "--report", str(report), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "nodes" in printed and "constant bytes" in printed and "file size" in printed
    data = json.loads(report.read_text())
    assert [s["pass"] for s in data["steps"]][0] == "prune-dead"
    assert data["after"]["nodes"] <= data["before"]["nodes"]
    images, _ = load_digits_test()
    feeds = {"image": images[:64]}
    assert_bit_identical(run_ort(onnx.load(str(digits_cnn_path())), feeds), run_ort(onnx.load(str(out)), feeds))


def test_compress_refuses_existing_output_without_force(toy: Path, tmp_path: Path, capsys, rng: np.random.Generator) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    assert main(["compress", str(toy), "-o", str(out), "--preset", "lossless", "--no-progress"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["compress", str(toy), "-o", str(out), "--preset", "lossless", "--force", "--no-progress"]) == 0
    x = rng.standard_normal((5, 3)).astype(np.float32)
    assert_bit_identical(run_ort(parse(TOY), {"x": x}), run_ort(onnx.load(str(out)), {"x": x}))


def test_compress_with_recipe_and_set(toy: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - pass: prune-dead\n  - pass: fold-constants\n")
    out = tmp_path / "out.onnx"
    report = tmp_path / "r.json"
    assert main(["compress", str(toy), "-o", str(out), "--recipe", str(recipe),
                 "--set", "2.size_budget_bytes=7", "--report", str(report), "--no-progress"]) == 0
    assert json.loads(report.read_text())["steps"][1]["options"]["size_budget_bytes"] == 7


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxpress", *args], capture_output=True, text=True)


def test_truncated_file_exits_2_with_one_line(toy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    data = toy.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    for args in (["inspect", str(bad)], ["compress", str(bad), "-o", str(tmp_path / "o.onnx"), "--preset", "lossless"]):
        result = _run_cli(*args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "bad.onnx" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_path_traversal_external_data_exits_2(tmp_path: Path) -> None:
    proto = parse(TOY)
    for i, init in enumerate(proto.graph.initializer):  # raw_data, so onnx moves them out
        proto.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init), init.name))
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    hostile = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for init in hostile.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../../../etc/passwd"
    assert any(i.external_data for i in hostile.graph.initializer)
    onnx.save(hostile, str(folder / "m.onnx"))
    result = _run_cli("compress", str(folder / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--preset", "lossless")
    assert result.returncode == 2
    assert "outside the model's folder" in result.stderr and "Traceback" not in result.stderr


def test_bad_recipe_key_exits_2(toy: Path, tmp_path: Path) -> None:
    result = _run_cli("compress", str(toy), "-o", str(tmp_path / "o.onnx"), "--preset", "lossless",
                      "--set", "fold-constants.budget=3")
    assert result.returncode == 2
    assert "steps[2].with.budget: unknown option" in result.stderr


def test_inspect_lists_subgraphs(tmp_path: Path, capsys) -> None:
    path = tmp_path / "if.onnx"
    onnx.save(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    {
      y = If(c) <then_branch = t () => (float[2] ty) {
            a = Abs(x)
            ty = Neg(a)
         }, else_branch = e () => (float[2] ey) {
            ey = Neg(x)
         }>
    }"""), str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "subgraphs: 2" in out
    assert "subgraph <unnamed> (If).then_branch: 2 nodes" in out
    assert "subgraph <unnamed> (If).else_branch: 1 nodes" in out


def test_inspect_and_compress_read_packed_models(tmp_path: Path, capsys) -> None:
    packed = tmp_path / "digits.onnxz"
    assert main(["pack", str(digits_cnn_path()), "-o", str(packed)]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(packed)]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["name"] == "image"
    out = tmp_path / "digits.onnx"
    assert main(["compress", str(packed), "-o", str(out), "--preset", "lossless", "--no-progress"]) == 0
    images, _ = load_digits_test()
    feeds = {"image": images[:32]}
    assert_bit_identical(run_ort(onnx.load(str(digits_cnn_path())), feeds), run_ort(onnx.load(str(out)), feeds))


def test_version_needs_no_subcommand_module() -> None:
    code = (
        "import sys\n"
        "from onnxpress.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.endswith('_cmd')))\n"
    )
    stdout = python_stdout(code)
    from onnxpress import __version__

    assert stdout.splitlines()[0] == f"onnxpress {__version__}"
    assert stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["--help", "run"], ["-v", "-h", "pack"]])
def test_top_level_help_describes_every_command(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "dataset" in out and "entropy-coded" in out  # run's and pack's one-line help
