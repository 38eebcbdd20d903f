"""PyTorch to ONNX: exports of several model families, the fallback, the fidelity gate, errors."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import onnx_ir as ir  # noqa: E402

from onnxpress.cli import main  # noqa: E402
from onnxpress.converters import ConversionError, from_torch  # noqa: E402
from onnxpress.converters.torch_export import _weights_only_loading, load_pt2  # noqa: E402
from onnxpress.errors import InputError, ValidationFailedError  # noqa: E402


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 6)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.a(left) + self.b(right))
        return hidden, hidden.sum(dim=-1)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, features: torch.Tensor, flags: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.lin(features)
        return {"logits": hidden, "kept": torch.where(flags, hidden, torch.zeros_like(hidden))}


class VarArgs(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.relu() for x in xs]).sum(0)


class DataDependent(nn.Module):
    """torch.export cannot trace the branch on a value; TorchScript traces one side of it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() > 1e6:
            return self.lin(x) * 0
        return self.lin(x)


@torch.library.custom_op("onnxpress_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(x) + 1


def test_cnn_exports_with_dynamic_batch(rng: np.random.Generator) -> None:
    module = SmallCNN().eval()
    result = from_torch(module, inputs=["image:Nx3x16x16:float32"])
    assert result.exporter == "torch.onnx dynamo"
    assert result.fidelity.passed and result.fidelity.batch_sizes == [1, 4]
    assert [v.name for v in result.model.graph.inputs] == ["image"]
    assert str(result.model.graph.inputs[0].shape[0]) == "N"
    x = rng.standard_normal((7, 3, 16, 16)).astype(np.float32)
    (got,) = _session(result.model).run(None, {"image": x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    # dynamo writes opset 18+: an older opset is converted, or the TorchScript exporter runs
    older = from_torch(module, inputs=["image:Nx3x16x16:float32"], opset=17)
    assert older.opset == 17 and older.fidelity.passed
    assert "opset" in older.exporter_note or older.exporter == "torch.onnx torchscript"


def test_transformer_encoder_dynamic_batch_and_sequence(rng: np.random.Generator) -> None:
    module = Encoder().eval()
    model, record = from_torch(module, inputs=["tokens:Bxseq=12:int64:0..50"])
    assert record.passed
    for row in record.outputs:
        assert row.cosine > 0.99999 and row.max_abs_error < 1e-4
    shapes = {row.batch_size: row.shape for row in record.outputs}
    assert shapes[1][1] == 12 and shapes[4][1] == 9  # the sequence length varied too
    tokens = rng.integers(0, 50, size=(3, 21))
    (got,) = _session(model).run(None, {"tokens": tokens})
    with torch.no_grad():
        expected = module(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_lstm_output_shape_is_not_pinned_to_the_example(rng: np.random.Generator) -> None:
    result = from_torch(Recurrent().eval(), inputs=["x:B,T,8:float32"])
    assert result.fidelity.passed
    out_shape = result.model.graph.outputs[0].shape
    assert not isinstance(out_shape[1], int), f"sequence axis pinned: {out_shape}"
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    assert _session(result.model).run(None, {"x": x})[0].shape == (2, 5, 16)


def test_two_inputs_two_outputs_from_example_inputs() -> None:
    module = TwoInTwoOut().eval()
    example = (torch.randn(3, 4), torch.randn(3, 5))
    result = from_torch(module, example, output_names=["hidden", "total"])
    assert [v.name for v in result.model.graph.inputs] == ["left", "right"]
    assert [v.name for v in result.model.graph.outputs] == ["hidden", "total"]
    assert {o.name for o in result.fidelity.outputs} == {"hidden", "total"}
    assert len(result.fidelity.outputs) == 4  # two outputs at two batch sizes
    with pytest.raises(InputError, match="returns 2"):
        from_torch(module, example, output_names=["only_one"])


def test_dict_outputs_keep_keys_and_varargs_stay_dynamic(rng: np.random.Generator) -> None:
    result = from_torch(DictOut().eval(), inputs=["features:Bx5:float32", "flags:Bx3:bool"])
    assert [v.name for v in result.model.graph.outputs] == ["logits", "kept"]
    assert result.fidelity.passed and result.exporter == "torch.onnx dynamo"
    varargs = from_torch(VarArgs(), inputs=["a:Bx4:float32", "b:Bx4:float32"])
    assert varargs.exporter == "torch.onnx dynamo", varargs.exporter_note
    a, b = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))
    (got,) = _session(varargs.model).run(None, {"a": a, "b": b})
    np.testing.assert_allclose(got, np.maximum(a, 0) + np.maximum(b, 0), atol=1e-6)


def test_dynamo_failure_falls_back_to_torchscript_and_says_why() -> None:
    result = from_torch(DataDependent().eval(), inputs=["x:Bx4:float32"])
    assert result.exporter == "torch.onnx torchscript"
    assert "dynamo exporter failed" in result.exporter_note
    assert "data-dependent" in result.exporter_note
    assert result.fidelity.passed


def _normal_then_huge() -> np.ndarray:
    """Two ordinary rows (traced at export and checked at batch 1), then two huge ones."""
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    x[2:] = 1e7
    return x


def test_mismatch_fails_with_exit_4_and_report(tmp_path: Path) -> None:
    # TorchScript traced the usual branch; rows above 1e6 take the other branch in PyTorch.
    script = tmp_path / "models.py"
    script.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        class DataDependent(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)
            def forward(self, x):
                if x.abs().max().item() > 1e6:
                    return self.lin(x) * 0
                return self.lin(x)
        def build():
            torch.manual_seed(0)
            return DataDependent()
    '''))
    data = tmp_path / "big.npz"
    np.savez(data, x=_normal_then_huge())
    out = tmp_path / "dd.onnx"
    report = tmp_path / "report.json"
    status = main([
        "convert", "torch", f"{script}:build", "-o", str(out), "--input", "x:Bx4:float32",
        "--data", str(data), "--report", str(report),
    ])
    assert status == 4
    assert not out.exists()  # a failed export is not written without --keep-failed
    record = json.loads(report.read_text())["conversion"]
    assert record["exporter"] == "torch.onnx torchscript"
    assert record["fidelity"]["passed"] is False
    assert record["fidelity"]["max_abs_error"] > 1.0


def test_cli_converts_file_spec_and_writes_report(tmp_path: Path, capsys, rng: np.random.Generator) -> None:
    script = tmp_path / "net.py"
    script.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(6, 2)
            def forward(self, features):
                return torch.softmax(self.lin(features), dim=-1)
        def build():
            return Net(), (torch.randn(2, 6),)
    '''))
    out = tmp_path / "net.onnx"
    report = tmp_path / "report.json"
    assert main(["convert", "torch", f"{script}:build", "-o", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "exporter: torch.onnx dynamo" in printed and "fidelity passed" in printed
    data = json.loads(report.read_text())
    assert data["conversion"]["fidelity"]["passed"] is True
    assert data["conversion"]["fidelity"]["batch_sizes"] == [1, 4]
    assert not Path(str(out) + ".data").exists()  # one file
    x = rng.standard_normal((3, 6)).astype(np.float32)
    probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"features": x})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # refuses to overwrite without --force
    assert main(["convert", "torch", f"{script}:build", "-o", str(out)]) == 2


def test_missing_callable_and_inputs_that_do_not_fit(tmp_path: Path, capsys) -> None:
    script = tmp_path / "net.py"
    script.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    out = str(tmp_path / "x.onnx")
    assert main(["convert", "torch", f"{script}:nope", "-o", out]) == 2
    assert "no callable 'nope'" in capsys.readouterr().err
    with pytest.raises(InputError, match="takes left, right, but 3 input"):
        from_torch(TwoInTwoOut(), inputs=["a:Bx4:float32", "b:Bx5:float32", "c:Bx1:float32"])
    with pytest.raises(InputError, match="also needs input.*right"):
        from_torch(TwoInTwoOut(), inputs=["left:Bx4:float32"])
    with pytest.raises(InputError, match="fails on the described inputs.*forward takes: x"):
        from_torch(SmallCNN(), inputs=["x:Bx3x16:float32"])
    with pytest.raises(InputError, match="--input NAME:SHAPE:DTYPE.*left, right"):
        from_torch(TwoInTwoOut())


def test_unconvertible_op_is_named_with_the_exporters_message() -> None:
    with pytest.raises(ConversionError) as info:
        from_torch(Mystery(), inputs=["x:Bx4:float32"])
    assert info.value.op == "onnxpress_test::mystery"
    message = str(info.value)
    assert "op 'onnxpress_test::mystery'" in message
    assert "[dynamo]" in message and "[torchscript]" in message
    assert info.value.exit_code == 3


def test_pt2_round_trip_and_pickles_refused(tmp_path: Path) -> None:
    module = TwoInTwoOut().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        module, (torch.randn(3, 4), torch.randn(3, 5)),
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    loaded = load_pt2(path)
    result = from_torch(loaded)
    assert result.fidelity.passed
    assert [v.name for v in result.model.graph.inputs] == ["left", "right"]

    class Payload:
        def __reduce__(self):  # would run code when unpickled
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, evil)
    with _weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=False)  # forced to weights_only
    not_pt2 = tmp_path / "junk.pt2"
    not_pt2.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.pt2: not a torch.export archive"):
        load_pt2(not_pt2)


def test_mismatch_raises_validation_error_from_the_api() -> None:
    data = {"x": _normal_then_huge()}
    with pytest.raises(ValidationFailedError, match="output 'output'") as info:
        from_torch(DataDependent().eval(), inputs=["x:Bx4:float32"], data=data)
    assert info.value.result.fidelity.passed is False
    result = from_torch(DataDependent().eval(), inputs=["x:Bx4:float32"], data=data, check=False)
    assert not result.fidelity.passed and result.fidelity.failures()


class ScaleByScalar(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * t


def test_scalar_input_stays_a_scalar() -> None:
    result = from_torch(ScaleByScalar(), inputs=["x:Bx3:float32", "t:scalar:float32"])
    assert result.fidelity.passed
    t = next(v for v in result.model.graph.inputs if v.name == "t")
    assert t.shape is not None and len(t.shape) == 0
    assert "t:scalar:float" in result.inputs


def test_factory_that_raises_and_pickle_files_are_input_errors(tmp_path: Path, capsys) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def build():\n    raise RuntimeError('no weights here')\n")
    out = str(tmp_path / "x.onnx")
    assert main(["convert", "torch", f"{script}:build", "-o", out, "--input", "x:Bx4:float32"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: no weights here" in err and "Traceback" not in err
    weights = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    assert main(["convert", "torch", str(weights), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and ".pt2" in err and "Traceback" not in err


def test_misspelt_input_name_lists_forwards_arguments() -> None:
    with pytest.raises(InputError, match="rihgt are not arguments.*takes: left, right"):
        from_torch(TwoInTwoOut(), inputs=["left:Bx4:float32", "rihgt:Bx5:float32"])


class SeqFirstGRU(nn.Module):
    """The dynamo exporter's GRU pins a size here; TorchScript's does not."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def test_dynamo_export_that_fails_the_check_falls_back_to_torchscript() -> None:
    result = from_torch(SeqFirstGRU(), inputs=["x:TxBx4:float32"])
    assert result.fidelity.passed
    assert result.exporter == "torch.onnx torchscript"
    assert "dynamo export failed the fidelity check" in result.exporter_note


class SizeAsConstant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for step in range(int(x.shape[1])):
            out = out + step
        return out


def test_a_dimension_the_export_fixed_is_named() -> None:
    result = from_torch(SizeAsConstant(), inputs=["x:BxSx4:float32"], exporter="dynamo", check=False)
    assert not result.fidelity.passed
    assert "fixed dimension(s) described as dynamic: x[1] 'S' = 16" in result.exporter_note


def test_dynamo_export_at_opset_17_keeps_global_pooling() -> None:
    result = from_torch(SmallCNN(), inputs=["x:Bx3x8x8:float32"], opset=17)
    assert result.exporter == "torch.onnx dynamo" and result.opset == 17
    assert result.fidelity.passed
    for node in result.model.graph:
        assert "noop_with_empty_axes" not in node.attributes or node.op_type == "ReduceSum"


class SharedSeq(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x.sum(-1) + ids.float()


def test_pt2_dimension_shared_by_two_inputs_keeps_one_name(tmp_path: Path) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.export.export(
        SharedSeq(), (torch.randn(3, 5, 4), torch.randint(0, 7, (3, 5))),
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
    )
    path = tmp_path / "shared.pt2"
    torch.export.save(program, str(path))
    result = from_torch(load_pt2(path))
    assert result.fidelity.passed
    x, ids = result.model.graph.inputs
    # Named after the first input that has it (it was named after the last one).
    assert str(x.shape[1]) == str(ids.shape[1]) == "x_dim1"
    assert str(x.shape[0]) == str(ids.shape[0]) == "batch"


class NamedTupleOut(nn.Module):
    Out = __import__("collections").namedtuple("Out", ["scores", "best"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Out(x.softmax(-1), x.amax(-1))


def test_namedtuple_fields_name_the_outputs() -> None:
    result = from_torch(NamedTupleOut(), inputs=["x:Bx3:float32"])
    assert result.fidelity.passed
    assert [v.name for v in result.model.graph.outputs] == ["scores", "best"]


class NestedDictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"logits": x * 2, "aux": (x + 1, (x - 1, x.abs()))}


def test_nested_dict_outputs_are_named_by_path() -> None:
    result = from_torch(NestedDictOut(), inputs=["x:Bx3:float32"])
    assert result.fidelity.passed
    assert [v.name for v in result.model.graph.outputs] == ["logits", "aux_0", "aux_1_0", "aux_1_1"]


def test_float16_model_is_checked_at_float16_tolerances() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64)).half()
    result = from_torch(model, inputs=["x:BxSx64:float16"])
    # A few float16 ulps apart (onnxruntime accumulates in another order): passes at the
    # float16 tolerances, which the record keeps per output.
    assert result.fidelity.passed, result.fidelity.failures()
    from onnxpress.converters.fidelity import FP16_ATOL, FP16_RTOL

    assert all((o.atol, o.rtol) == (FP16_ATOL, FP16_RTOL) for o in result.fidelity.outputs)
    assert all(o.cosine > 0.9999 for o in result.fidelity.outputs)
