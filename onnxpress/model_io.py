"""Loading and saving ONNX models safely.

Loading goes through onnx_ir, so external data is memory-mapped and never copied. Before a
single weight is touched, every external-data reference is checked: its location must stay
inside the model's folder (no absolute path, no ``..``, no link that leads out) and the bytes
it names must exist. Saving is atomic: the model (and its external data) is written into a
temporary folder beside the target and renamed into place, so a failure leaves nothing half
written and an existing output is replaced only when the caller asks for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnxpress.errors import InputError
from onnxpress.graphs import constant_tensors, initializer_values, proto_graphs, set_aside_map_types

logger = logging.getLogger(__name__)

#: Constants above this many bytes in total are saved as external data automatically.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.5 * 1024**3)
#: Tensors at least this large go to the external data file when external data is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Loads an ONNX model with its external data memory-mapped.

    Args:
        path: The ``.onnx`` file, or a packed ``.onnxz`` (decoded in memory, up to 2 GB).

    Returns:
        The model as onnx_ir; external tensors stay on disk until read.

    Raises:
        InputError: The file is missing, empty, truncated or not ONNX, or an external-data
            reference escapes the model's folder or points past the end of its file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty, expected an ONNX model")
    from onnxpress.packing.unpack import is_packed, load_packed_model  # packing imports this module

    if is_packed(path):
        return load_packed_model(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(
            f"{path}: not a readable ONNX model (truncated or not ONNX): {exc}"
        ) from exc
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (it has no graph or no IR version)")
    _densify_sparse(proto, path)
    _spell_default_domain(proto)
    map_types = set_aside_map_types(proto)
    try:
        model = ir.from_proto(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise InputError(f"{path}: cannot read the graph: {exc}") from exc
    del proto
    if map_types:
        model.meta[_MAP_TYPES] = map_types
    _attach_external_data(model, path)
    try:
        # By path, so external data resolves against the model's folder and >2 GB works.
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        if "topologically sorted" in str(exc) and _sorts_into_a_valid_model(model):
            logger.warning("%s: the nodes were not in topological order; sorted them", path)
            return model
        if _checker_only_complaint(str(exc)) and _valid_once_normalized(path):
            return model
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InputError(f"{path}: not a valid ONNX model: {first_line}") from exc
    return model


def _sorts_into_a_valid_model(model: ir.Model) -> bool:
    """Sorts every graph and function topologically (onnxruntime runs unsorted graphs, as
    onnx's checker and the passes do not), then checks the model again, large weights aside."""
    model.graph.sort()
    for function in model.functions.values():
        function.sort()
    try:
        _c_api_utils.call_onnx_api(onnx.checker.check_model, model)
    except (onnx.checker.ValidationError, ValueError):
        return False
    return True


def _checker_only_complaint(message: str) -> bool:
    """Complaints of onnx's checker about models that the IR allows and onnxruntime runs."""
    return "Field 'shape' of 'type' is required" in message or "No Op registered for" in message


def _spell_default_domain(proto: onnx.ModelProto) -> None:
    """Writes the default domain as ``""`` where the model spells it ``ai.onnx``.

    Both name the same operator set (the IR says so, and onnxruntime runs either); onnx's
    checker and onnx_ir know only ``""``.
    """
    for holder in [proto, *proto.functions]:
        imports = {o.domain: o for o in holder.opset_import}
        if "ai.onnx" in imports and "" not in imports:
            imports["ai.onnx"].domain = ""
    for nodes in [g.node for g in proto_graphs(proto)] + [f.node for f in proto.functions]:
        for node in nodes:
            if node.domain == "ai.onnx":
                node.domain = ""


def _valid_once_normalized(path: Path) -> bool:
    """Whether the model passes onnx's checker once the default domain is spelled ``""`` and
    graph inputs and outputs of unknown rank (a tensor type without a shape) are given one."""
    proto = onnx.load(str(path), load_external_data=False)
    _spell_default_domain(proto)
    for graph in proto_graphs(proto):
        for info in [*graph.input, *graph.output]:
            if info.type.HasField("tensor_type") and not info.type.tensor_type.HasField("shape"):
                info.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError):
        return False
    return True


#: ``model.meta`` key: the map-typed graph inputs and outputs set aside at load, by name.
_MAP_TYPES = "onnxpress.map_types"


def _restore_map_types(path: Path, types: dict[str, bytes]) -> None:
    """Puts the map types set aside at load back on the saved graph inputs and outputs."""
    proto = onnx.load(str(path), load_external_data=False)
    for graph in proto_graphs(proto):
        for info in [*graph.input, *graph.output]:
            if info.name in types and not info.type.WhichOneof("value"):
                info.type.ParseFromString(types[info.name])
    onnx.save(proto, str(path))


def _densify_sparse(proto: onnx.ModelProto, path: Path) -> None:
    """Stores sparse initializers and ``Constant(sparse_value)`` densely, in every graph.

    onnx_ir drops sparse initializers and cannot read sparse Constants; onnxruntime
    densifies both when it loads the model anyway, so the outputs are the same bits.
    """

    def dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in (sparse.values, sparse.indices)):
            raise InputError(
                f"{path}: sparse tensor '{sparse.values.name}' keeps its data outside the model; "
                "only sparse tensors stored in the file are supported"
            )
        values = onnx.numpy_helper.to_array(sparse.values)
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        shape = tuple(sparse.dims)
        array = np.zeros(shape, dtype=values.dtype)
        if values.dtype == object:
            array[...] = b""
        if indices.ndim == 2:
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        array.reshape(-1)[indices] = values.reshape(-1)
        return onnx.numpy_helper.from_array(array, sparse.values.name)

    def visit(graph: onnx.GraphProto) -> None:
        for sparse in graph.sparse_initializer:
            graph.initializer.append(dense(sparse))
        if len(graph.sparse_initializer):
            logger.info("%s: stored %d sparse initializers densely", path, len(graph.sparse_initializer))
            del graph.sparse_initializer[:]
        visit_nodes(graph.node)

    def visit_nodes(nodes) -> None:
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR and node.op_type == "Constant":
                    tensor = dense(attr.sparse_tensor)
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("value", tensor))
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for graph in attr.graphs:
                        visit(graph)

    visit(proto.graph)
    for function in proto.functions:
        visit_nodes(function.node)


def _attach_external_data(model: ir.Model, path: Path) -> None:
    """Points external tensors at the model's folder after checking every location is safe."""
    base_dir = path.resolve().parent
    for owner, tensor in constant_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = str(tensor.location)
        candidate = Path(location)
        if candidate.is_absolute() or ".." in candidate.parts or location.startswith(("/", "\\")):
            raise InputError(
                f"{path}: tensor '{owner}' names external data at '{location}', "
                "which is outside the model's folder; only relative paths inside it are allowed"
            )
        resolved = (base_dir / candidate).resolve()
        if not resolved.is_relative_to(base_dir):
            raise InputError(
                f"{path}: tensor '{owner}' names external data at '{location}', "
                f"which leads out of the model's folder to {resolved}"
            )
        if not resolved.is_file():
            raise InputError(
                f"{path}: tensor '{owner}' needs external data file '{location}', "
                f"which does not exist in {base_dir}"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = resolved.stat().st_size
        if end > size:
            raise InputError(
                f"{path}: tensor '{owner}' needs bytes up to {end} of '{location}', "
                f"but that file has only {size} bytes (truncated?)"
            )
        tensor.base_dir = str(base_dir)


def constant_bytes(model: ir.Model) -> int:
    """Total bytes of all constants: initializers and tensor attributes, subgraphs included."""
    return sum(tensor.nbytes for _, tensor in constant_tensors(model))


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    external_data: bool | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Saves a model atomically, with external data when it is large or when asked.

    The model and its ``<name>.data`` file are written into a temporary folder beside the
    target and then renamed into place, so readers never see a half-written model and a
    failure leaves any existing output as it was.

    Args:
        model: The model to save. It is not changed.
        path: The target ``.onnx`` file.
        force: Replace an existing output. Without it an existing output is an error.
        external_data: ``True`` writes tensors to ``<name>.data``; ``False`` keeps them in
            the file; ``None`` writes external data when constants exceed
            :data:`EXTERNAL_DATA_THRESHOLD_BYTES`.
        source: The file the model was loaded from; saving over it is refused, so the
            input is never touched.

    Returns:
        The path written.

    Raises:
        InputError: The output exists without ``force``, is the input, or its folder is missing.
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise InputError(f"{path}: the output is the input model; choose another output path")
    if path.exists() and not force:
        raise InputError(f"{path}: the output already exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the output folder {path.parent} does not exist")
    if external_data is None:
        external_data = constant_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(
                model,
                tmp_model,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            _save_inlined(model, tmp_model)
        if model.meta.get(_MAP_TYPES):
            _restore_map_types(tmp_model, model.meta[_MAP_TYPES])
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
        if not external_data:  # a sidecar left by an earlier save of this output is stale now
            (path.parent / data_name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("Saved %s%s", path, " with external data " + data_name if external_data else "")
    return path


def saved_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model written by :func:`save_model`: the file and its ``.data``."""
    path = Path(path)
    sidecar = path.parent / (path.name + ".data")
    return path.stat().st_size + (sidecar.stat().st_size if sidecar.exists() else 0)


def _save_inlined(model: ir.Model, path: Path) -> None:
    """Saves one self-contained file, reading external tensors in for the write only."""
    values = [
        v for v in initializer_values(model) if isinstance(v.const_value, ir.ExternalTensor)
    ]
    originals = [v.const_value for v in values]
    try:
        loaded = ir.external_data.convert_tensors_from_external(originals)
        for value, tensor in zip(values, loaded, strict=True):
            value.const_value = tensor
        ir.save(model, path)
    finally:
        for value, tensor in zip(values, originals, strict=True):
            value.const_value = tensor
