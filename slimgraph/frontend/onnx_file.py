"""Safe loading and deterministic saving of ``.onnx`` files (external data included).

Everything a file can get wrong is found here, before onnxruntime or any other reader sees it:
the file is sniffed for torch checkpoints (never unpickled), parsed without its external data,
every external-data reference is checked against the model's folder, and the graph goes through
the full ONNX checker. Weights in external files stay on disk until used (``ir.ExternalTensor``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from slimgraph.errors import ModelLoadError

# Largest serialised protobuf message; an .onnx file beyond it cannot be parsed.
_PROTOBUF_LIMIT = 2**31 - 1

# Past this, the checker cannot take the model in memory and must read it from disk.
_IN_MEMORY_CHECK_BYTES = _PROTOBUF_LIMIT

_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
_ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocols 2-5 open with PROTO (0x80) and the protocol number. No valid ModelProto can
# start with 0x80 or "PK": those bytes would be tags of fields ModelProto does not have.
_PICKLE_PROTOCOLS = range(2, 6)

_CHECKPOINT_ADVICE = (
    "slimgraph never unpickles model files. Pass a 'package.module:callable' that builds the "
    "torch module and loads its weights with torch.load(weights_only=True) or safetensors, "
    "or pass an exported .onnx file"
)

_NODE_IN_CHECKER_MESSAGE = (
    re.compile(r"node name: ([^)]*)\)"),
    re.compile(r"Name: (\S*) OpType: (\S+)"),
)


def load_onnx(path: str | Path) -> ir.Model:
    """Load an .onnx file (external data allowed) safely; raise ModelLoadError naming the file
    and the fault."""
    path = Path(path).absolute()
    data = _read_model_bytes(path)
    proto = _parse(path, data)
    external = [
        _check_external_data(path, tensor)
        for tensor in _all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    ]
    _check_graph(path, proto, external)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # whatever the converter trips on, the file is at fault
        raise ModelLoadError(f"{path}: cannot be converted to the IR: {err}") from err
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def save_onnx(
    model: ir.Model, path: Path, *, external_data_threshold: int = 2**31 - 2**20
) -> list[Path]:
    """Write ``model`` deterministically (byte-identical for the same model) and return the
    files written; initializers go to ``<name>.data`` beside it only when their total size
    exceeds ``external_data_threshold`` (default: just under protobuf's 2 GB limit)."""
    path = Path(path)
    initializers = [
        v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    ]
    total = sum(v.const_value.nbytes for v in initializers)
    if total > external_data_threshold:
        data_path = path.with_name(path.name + ".data")
        # ir.save moves every initializer above size_threshold_bytes into data_path, reading
        # tensors that already live on disk (even in data_path itself) before replacing it.
        ir.save(
            model, path, format="protobuf", external_data=data_path.name, size_threshold_bytes=0
        )
        return [path, data_path]
    # Inline: tensors still backed by another file must be read into the proto, not referenced.
    on_disk = [v for v in initializers if isinstance(v.const_value, ir.ExternalTensor)]
    originals = [v.const_value for v in on_disk]
    try:
        loaded = ir.external_data.convert_tensors_from_external(originals)
        for value, tensor in zip(on_disk, loaded, strict=True):
            value.const_value = tensor
        ir.save(model, path, format="protobuf")
    finally:
        for value, tensor in zip(on_disk, originals, strict=True):
            value.const_value = tensor
    return [path]


def _read_model_bytes(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file. Check the path to the .onnx model.") from None
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot be read ({err.strerror}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadError(f"{path}: is a directory. Pass the .onnx file inside it.")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path}: is not a regular file. Pass an .onnx file.")
    if path.suffix.lower() in _TORCH_SUFFIXES:
        raise ModelLoadError(
            f"{path}: '{path.suffix}' files are torch checkpoints, not ONNX models. "
            f"{_CHECKPOINT_ADVICE}."
        )
    if st.st_size == 0:
        raise ModelLoadError(f"{path}: is empty (0 bytes). Pass a complete .onnx file.")
    if st.st_size > _PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{path}: is {st.st_size} bytes, beyond protobuf's 2 GiB limit, so it is not a valid "
            "ONNX file. Models this large keep their weights in external data files."
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot be read ({err.strerror}).") from None
    is_zip = data.startswith(_ZIP_MAGIC)
    if is_zip or (len(data) > 1 and data[0] == 0x80 and data[1] in _PICKLE_PROTOCOLS):
        kind = "zip archive" if is_zip else "pickle"
        raise ModelLoadError(
            f"{path}: is a {kind} (a torch checkpoint), not an ONNX model. {_CHECKPOINT_ADVICE}."
        )
    return data


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    try:
        proto = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        # Writers put ir_version (field 1, varint: tag byte 0x08) first; a file that starts
        # like a ModelProto but does not parse was cut short or damaged.
        if data[0] == 0x08:
            raise ModelLoadError(
                f"{path}: is a truncated or corrupt ONNX file ({err}). Re-export or re-copy it."
            ) from None
        raise ModelLoadError(
            f"{path}: is not an ONNX model (not a ModelProto protobuf: {err}). Pass an .onnx "
            "file written by torch.onnx.export or onnx.save."
        ) from None
    # Protobuf parsing is lenient: arbitrary bytes can decode as a message of unknown fields.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(
            f"{path}: is not an ONNX model (no ir_version or no graph). Pass an .onnx file "
            "written by torch.onnx.export or onnx.save."
        )
    return proto


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, attributes, subgraphs, functions."""

    def from_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from from_nodes(graph.node)

    def from_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sparse in [attr.sparse_tensor, *attr.sparse_tensors]:
                    yield from (sparse.values, sparse.indices)
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    yield from from_graph(model.graph)
    for function in model.functions:
        yield from from_nodes(function.node)
    for info in model.training_info:
        yield from from_graph(info.initialization)
        yield from from_graph(info.algorithm)


@dataclasses.dataclass(frozen=True)
class _ExternalSpan:
    """Where a validated external tensor's bytes are: a file inside the model's folder."""

    file: Path
    offset: int
    length: int


def _check_external_data(path: Path, tensor: onnx.TensorProto) -> _ExternalSpan:
    """Refuse external data that leaves the model's folder, is missing, or is too short."""
    where = f"{path}: tensor '{tensor.name}'"
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"{where} is stored externally but names no location.")
    parts = re.split(r"[\\/]", location)
    if (
        PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or PureWindowsPath(location).drive
        or location.startswith(("/", "\\"))
    ):
        raise ModelLoadError(
            f"{where} has an absolute external-data location '{location}'. External data must "
            "be a path relative to the model's folder; move the file beside the model."
        )
    if ".." in parts or "\x00" in location:
        raise ModelLoadError(
            f"{where} has external-data location '{location}', which leaves the model's folder. "
            "External data must live inside the folder of the .onnx file."
        )
    folder = path.parent.resolve()
    candidate = path.parent / location
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ModelLoadError(
            f"{where}: external-data location '{location}' cannot be resolved ({err}). "
            "Fix the link or replace it with the file."
        ) from None
    if not resolved.is_relative_to(folder):
        raise ModelLoadError(
            f"{where} has external-data location '{location}', which resolves through a "
            f"symlink to {resolved}, outside the model's folder {folder}. Copy the data file "
            "into the folder instead of linking to it."
        )
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise ModelLoadError(
            f"{where} needs external-data file {candidate}, which does not exist. Keep the "
            "data file beside the .onnx file it was saved with."
        ) from None
    except OSError as err:
        raise ModelLoadError(f"{where}: external-data file {candidate}: {err.strerror}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{where}: external-data location {candidate} is not a file.")
    # A hard link is a second name for the same file with nothing recording the first, so one
    # whose other name lies outside the folder cannot be told apart from a harmless one, and
    # onnxruntime 1.32 reads through it. Refuse every multiply-linked data file.
    if st.st_nlink > 1:
        raise ModelLoadError(
            f"{where}: external-data file {candidate} has {st.st_nlink} hard links; slimgraph "
            "cannot tell whether another name of it lies outside the model's folder, so it "
            "refuses it. Replace it with a plain copy (cp, not ln)."
        )
    offset = _external_int(where, entries, "offset", 0)
    expected = _tensor_nbytes(where, tensor)
    length = _external_int(where, entries, "length", expected)
    if length != expected:
        raise ModelLoadError(
            f"{where}: external-data length {length} does not match its shape and type "
            f"({expected} bytes). The model and {candidate.name} do not belong together."
        )
    if offset + length > st.st_size:
        raise ModelLoadError(
            f"{where}: external data at offset {offset} with length {length} runs past the end "
            f"of {candidate} ({st.st_size} bytes). The data file is truncated or is not the one "
            "this model was saved with."
        )
    return _ExternalSpan(resolved, offset, length)


def _external_int(where: str, entries: dict[str, str], key: str, default: int) -> int:
    if key not in entries:
        return default
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise ModelLoadError(f"{where}: external-data {key} '{entries[key]}' is not a byte count.")
    return value


def _tensor_nbytes(where: str, tensor: onnx.TensorProto) -> int:
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        raise ModelLoadError(
            f"{where}: data type {tensor.data_type} cannot be stored as external data."
        ) from None
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def _check_graph(path: Path, proto: onnx.ModelProto, external: list[_ExternalSpan]) -> None:
    """Run the full ONNX checker (with shape inference) and name the failing node."""
    # The in-memory checker looks for external data relative to the working directory and the
    # path form refuses every symlink, even one inside the folder; so it is given a copy with the
    # already-validated external bytes inlined, and the path only past protobuf's 2 GB limit.
    target: onnx.ModelProto | str = proto
    if external:
        if sum(span.length for span in external) + proto.ByteSize() <= _IN_MEMORY_CHECK_BYTES:
            target = _with_external_data_inlined(proto, external)
        else:
            target = os.fspath(path)
    try:
        onnx.checker.check_model(target, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        message = str(err).strip()
        node = ""
        for pattern in _NODE_IN_CHECKER_MESSAGE:
            if match := pattern.search(message):
                node = f" at node '{match.group(1)}'"
                if match.lastindex == 2:
                    node += f" ({match.group(2)})"
                break
        advice = "Fix or re-export the model"
        if "symbolic link" in message:
            advice = (
                "Models over 2 GB are checked from disk, where onnx refuses symlinks: "
                "replace the symlink with the file it points to"
            )
        raise ModelLoadError(
            f"{path}: fails the ONNX checker{node}: {message.splitlines()[0]}. {advice}."
        ) from None


def _with_external_data_inlined(
    proto: onnx.ModelProto, external: list[_ExternalSpan]
) -> onnx.ModelProto:
    inlined = onnx.ModelProto()
    inlined.CopyFrom(proto)
    tensors = (t for t in _all_tensors(inlined) if t.data_location == onnx.TensorProto.EXTERNAL)
    for tensor, span in zip(tensors, external, strict=True):
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            tensor.raw_data = f.read(span.length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return inlined
