"""Packed model files: ``save_packed`` / ``load_packed`` (design §3). Nothing is ever unpickled.

A ``.ovsw`` file (format version 2) is a plain `safetensors <https://github.com/huggingface/safetensors>`_
file, written by ``safetensors.torch.save_file`` and read through ``safetensors.safe_open``::

    offset 0    uint64 little-endian   N, the length of the JSON header (at most 100 MB)
    offset 8    N bytes                header: UTF-8 JSON object
                                         {"__metadata__": {str: str},
                                          "<state_dict key>": {"dtype": "I32", "shape": [64, 3, 3, 2],
                                                               "data_offsets": [begin, end]}, ...}
    offset 8+N                         the tensors' raw bytes, little-endian, C order, back to back
                                       (offsets relative to 8+N, covering it exactly)

The tensors are the packed model's ``state_dict``: the bit-packed weights (int32 words), the folded
``scale`` / ``bias`` of every packed layer, and the parameters and buffers of the full-precision layers.
``__metadata__`` holds these keys, ``format`` and ``format_version`` as plain strings, the others as
JSON text:

    format          "lightning-ovsw-packed"
    format_version  "2"
    versions        {"lightning_ovsw": ..., "torch": ..., "safetensors": ...}, the writer's versions
    modules         {"<module name>": {"type": "PackedConv2d", "stride": [1, 1], ...}}: each packed
                    layer's configuration, which tensor shapes alone do not pin down, and each
                    ``RealShortcut`` (no tensors: only this table tells a model with them from one without)
    pack_options    the ``pack_model`` options the model was packed with (``null`` if unknown), so that
                    ``load_packed`` packs a binarized target the same way
    float_dtype     ``null``, or the dtype the full-precision conv / linear weights were stored in
    user_metadata   the caller's ``metadata`` (any JSON object), kept apart from the library's keys
    checksums       {"tensors": {"<key>": sha256 hex of the tensor's bytes}, "metadata": sha256 hex of
                    the UTF-8 JSON ``[[key, value], ...]`` of the other entries, sorted by key,
                    separators ``(",", ":")``}

The checksums detect corruption (a bad copy, a flipped bit), not tampering: anyone can recompute them.
Format-1 files (magic ``OVSWPACK``) are refused with a message saying how to convert them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from typing import Any

import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import lightning_ovsw
from lightning_ovsw.packed_layers import PackedConv2d, PackedLinear
from lightning_ovsw.packing import pack_model
from lightning_ovsw.registry import binary_layers, full_precision_layers, packed_layers
from lightning_ovsw.shortcuts import RealShortcut

FORMAT = "lightning-ovsw-packed"
FORMAT_VERSION = 2
MAGIC = b"OVSWPACK"  # the first 8 bytes of a format-1 file, which this version refuses
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_AGAIN = "copy it again, or re-create it with save_packed"
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_METADATA_KEYS = (
    "format", "format_version", "versions", "modules", "pack_options", "float_dtype", "user_metadata", "checksums",
)
_MODULE_FIELDS = {
    PackedConv2d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "pad_value", "centered",
    ),
    PackedLinear: ("in_features", "out_features", "bn_folded", "centered"),
    RealShortcut: ("in_channels", "out_channels", "stride", "centered"),
}


def _module_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Configuration of every packed layer and real-valued shortcut, JSON-ready (tuples become lists)."""
    configs = {}
    shortcuts = [(name, m) for name, m in model.named_modules() if isinstance(m, RealShortcut)]
    for name, m in [*packed_layers(model), *shortcuts]:
        fields = _MODULE_FIELDS[type(m)]
        configs[name] = {"type": type(m).__name__} | {
            f: list(v) if isinstance(v, tuple) else v for f, v in ((f, getattr(m, f)) for f in fields)
        }
    return configs


def _float_layer_keys(model: nn.Module) -> set[str]:
    """State keys of the full-precision conv / linear layers (the tensors ``float_dtype`` may shrink)."""
    keys = set()
    for name, m in full_precision_layers(model):
        keys.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
    return keys


def _is_scalar(value: Any) -> bool:
    """A JSON scalar that round-trips exactly (finite numbers only)."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def _tensor_sha256(t: Tensor) -> str:
    """sha256 of a contiguous CPU tensor's bytes, hashed in place (no copy)."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _metadata_sha256(meta: Mapping[str, str]) -> str:
    """sha256 of every ``__metadata__`` entry but ``checksums`` (see the module docstring)."""
    items = sorted([k, v] for k, v in meta.items() if k != "checksums")
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    float_dtype: torch.dtype | None = None,
) -> int:
    """Write a packed model (from ``pack_model``) to ``path``; return the file size in bytes.

    Args:
        metadata: JSON-serializable extra information (e.g. the architecture name), stored as it is
            under its own key: it can neither overwrite nor be overwritten by the library's entries.
        float_dtype: store the weights of the layers kept in full precision (first conv, classifier,
            float shortcuts) as ``torch.float16`` / ``torch.bfloat16`` to shrink the file (lossy; they
            are cast back to the target model's dtype on load). Norm layers and the packed layers'
            folded constants are always stored as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_packed expects an nn.Module, got {type(model).__name__}.")
    if not packed_layers(model):
        raise ValueError(
            "save_packed expects a packed model; call lightning_ovsw.packing.pack_model(model) first."
        )
    configs = _module_configs(model)
    if float_dtype not in (None, *_FLOAT_DTYPES.values()):
        raise ValueError(
            f"float_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {float_dtype}."
        )
    options = getattr(model, "pack_options", None)
    if options is not None and not (
        isinstance(options, dict) and all(isinstance(k, str) and _is_scalar(v) for k, v in options.items())
    ):
        raise ValueError(f"the model's pack_options must be a dict of JSON scalars, got {options!r}.")
    try:
        user = json.dumps(dict(metadata or {}), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"metadata must be JSON-serializable: {err}") from None

    shrink = _float_layer_keys(model) if float_dtype is not None else set()
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key in shrink and t.is_floating_point():
            t = t.to(float_dtype)
        if t.dtype not in _DTYPES.values():
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which packed model files do not support.")
        t = t.contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:  # tied weights: safetensors wants one copy each
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    versions = {"lightning_ovsw": lightning_ovsw.__version__, "torch": torch.__version__,
                "safetensors": safetensors.__version__}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "versions": json.dumps(versions),
        "modules": json.dumps(configs, separators=(",", ":")),
        "pack_options": json.dumps(options),
        "float_dtype": json.dumps(str(float_dtype).removeprefix("torch.") if float_dtype else None),
        "user_metadata": user,
    }
    digests = {key: _tensor_sha256(t) for key, t in tensors.items()}
    meta["checksums"] = json.dumps({"tensors": digests, "metadata": _metadata_sha256(meta)}, separators=(",", ":"))
    save_file(tensors, path, metadata=meta)
    return os.path.getsize(path)


def _bad(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {what}")


def _strict_json(path: str | os.PathLike, field: str, text: str) -> Any:
    """Parse ``text`` as strict JSON (no NaN / Infinity, no duplicate keys); errors name ``field``."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
            raise ValueError(f"duplicate key {dup!r}")
        return out

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise _bad(path, f"{field} is JSON nested too deeply to parse") from None
    except ValueError as err:
        raise _bad(path, f"{field} is not valid JSON: {err}") from None


def _check_tensor_entry(path: str | os.PathLike, key: str, entry: Any) -> tuple[int, int]:
    """Validate one header entry against the safetensors rules; return its ``(begin, end)``."""
    field = f"header entry {key!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"{field} must be an object with exactly 'dtype', 'shape' and 'data_offsets', got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise _bad(path, f"{field}: dtype {dtype!r:.50} is not one of {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _bad(path, f"{field}: shape must be a list of non-negative integers, got {shape!r:.200}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"{field}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.200}")
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != need:
        raise _bad(path, f"{field}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, dtype {dtype} "
                         f"and shape {shape} need {need}")
    return offsets[0], offsets[1]


def _read_header(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """Check the file's prefix, header and size before any tensor is read: ``(__metadata__, tensor keys)``.

    The file is opened without blocking and must be a regular file (not a FIFO, device or directory).
    """
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise _bad(path, f"not a regular file ({kind}); a packed model file is a regular .ovsw file")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if prefix == MAGIC:
            raise _bad(path, "this file has packed-file format 1 (magic OVSWPACK), which this lightning-ovsw "
                             f"({lightning_ovsw.__version__}) no longer reads: load it with the lightning-ovsw release "
                             "that wrote it and save it again with this version's save_packed")
        if len(prefix) < 8:
            raise _bad(path, f"truncated: {size} bytes, shorter than the 8-byte header length; {_AGAIN}")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or n < 2:
            raise _bad(path, f"the 8-byte header length says {n} bytes, outside 2..{MAX_HEADER_BYTES}: not a "
                             "lightning-ovsw packed model (safetensors) file, or a corrupted one")
        if 8 + n > size:
            raise _bad(path, f"truncated: the header needs {n} bytes, only {size - 8} present; {_AGAIN}")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _bad(path, f"header is not valid UTF-8 (byte {err.start}): not a packed model file, or corrupted") from None
    header = _strict_json(path, "header", text)
    if not isinstance(header, dict):
        raise _bad(path, f"header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
        raise _bad(path, f"not a lightning-ovsw packed model file (no __metadata__ with format {FORMAT!r}); "
                         "write one with lightning_ovsw.io.save_packed")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _bad(path, f"__metadata__ {key!r} must be a string, got {type(value).__name__}")
    spans = sorted((_check_tensor_entry(path, key, entry), key) for key, entry in header.items())
    end = 0
    for (begin, stop), key in spans:
        if begin != end:
            raise _bad(path, f"header entry {key!r}: data_offsets [{begin}, {stop}] "
                             f"{'overlap the previous tensor' if begin < end else 'leave a gap'} (expected to start at {end})")
        end = stop
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else f"{size - 8 - n - end} trailing bytes after the tensors"
        raise _bad(path, f"{what}: the header declares {8 + n + end} bytes, the file has {size}; {_AGAIN}")
    return meta, [key for _, key in spans]


def _library_metadata(path: str | os.PathLike, meta: dict[str, str], keys: list[str]) -> dict[str, Any]:
    """Validate the library's ``__metadata__`` entries (each error names its entry) and parse them."""
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise _bad(path, f"uses packed-file format version {version!r:.20}; this lightning-ovsw "
                         f"({lightning_ovsw.__version__}) reads version {FORMAT_VERSION}. Install the version "
                         "that wrote it, or re-save the model with this one")
    if set(meta) != set(_METADATA_KEYS):
        odd = sorted(set(meta) ^ set(_METADATA_KEYS))
        raise _bad(path, f"__metadata__ keys missing or unknown: {odd}")
    parsed = {k: _strict_json(path, f"__metadata__ {k!r}", meta[k]) for k in _METADATA_KEYS[2:]}

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise _bad(path, f"__metadata__ {key!r} must be {what}, got {parsed[key]!r:.200}")

    versions, modules, options = parsed["versions"], parsed["modules"], parsed["pack_options"]
    need(isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()), "versions",
         "an object of version strings")
    need(isinstance(modules, dict) and all(isinstance(v, dict) for v in modules.values()), "modules",
         "an object of layer configurations")
    need(options is None or (isinstance(options, dict) and all(_is_scalar(v) for v in options.values())),
         "pack_options", "null or an object of JSON scalars")
    need(parsed["float_dtype"] is None or parsed["float_dtype"] in _FLOAT_DTYPES, "float_dtype",
         f"null or one of {sorted(_FLOAT_DTYPES)}")
    need(isinstance(parsed["user_metadata"], dict), "user_metadata", "an object")
    sums = parsed["checksums"]
    need(
        isinstance(sums, dict) and set(sums) == {"tensors", "metadata"} and isinstance(sums["tensors"], dict)
        and sorted(sums["tensors"]) == sorted(keys)
        and all(isinstance(h, str) and len(h) == 64 for h in (*sums["tensors"].values(), sums["metadata"])),
        "checksums", "{'tensors': {key: sha256 hex} for every tensor, 'metadata': sha256 hex}",
    )
    if _metadata_sha256(meta) != sums["metadata"]:
        raise _bad(path, f"checksum mismatch for __metadata__: the file is corrupted; {_AGAIN}")
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "versions": versions, "modules": modules,
        "pack_options": options, "float_dtype": parsed["float_dtype"], "metadata": parsed["user_metadata"],
        "checksums": sums["tensors"],
    }


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a packed model file: ``(state tensors, header)``; raises ``ValueError`` if bad.

    The header dict has ``format``, ``version``, ``versions``, ``modules``, ``pack_options``,
    ``float_dtype``, ``metadata`` (the caller's, as saved) and ``checksums``. The prefix, header and
    file size are checked before any tensor byte is read; the tensors are then memory-mapped by
    safetensors (read once, no copy) and each one is checked against its sha256. They map the file
    copy-on-write: do not truncate or rewrite it while they are alive (``load_packed`` copies and drops them).
    """
    meta, keys = _read_header(path)
    header = _library_metadata(path, meta, keys)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in keys}
    except SafetensorError as err:
        raise _bad(path, f"safetensors refused the file: {err}") from None
    for key, t in tensors.items():
        if _tensor_sha256(t) != header["checksums"][key]:
            raise _bad(path, f"checksum mismatch for tensor {key!r}: the file is corrupted; {_AGAIN}")
    return tensors, header


def _mismatch(path: str | os.PathLike, problems: list[str]) -> ValueError:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    return ValueError(
        f"{os.fspath(path)} does not match the target model: {shown}. Pass the same architecture (and "
        "binarize_model options, layer_shortcuts and unnormalized included) as the model that was saved."
    )


def _problems(tensors: Mapping[str, Tensor], header: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Every difference between the file and ``model``: pack options (first: they explain the rest), keys,
    shapes, dtypes, layer configurations."""
    state, options = model.state_dict(), getattr(model, "pack_options", None)
    problems = []
    if header["pack_options"] is not None and options is not None and header["pack_options"] != options:
        problems.append(f"pack options are {header['pack_options']} in the file, {options} in the model")
    problems += [f"missing key {k!r}" for k in state if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in state]
    shrunk = _FLOAT_DTYPES.get(header["float_dtype"])
    float_keys = _float_layer_keys(model) if shrunk is not None else set()
    for k in state.keys() & tensors.keys():
        got, want = tensors[k], state[k]
        if got.shape != want.shape:
            problems.append(f"{k!r} has shape {list(got.shape)} in the file, {list(want.shape)} in the model")
        stored_smaller = k in float_keys and want.is_floating_point() and got.dtype == shrunk
        if got.dtype != want.dtype and not stored_smaller:
            problems.append(f"{k!r} has dtype {got.dtype} in the file, {want.dtype} in the model")
    saved, target = header["modules"], _module_configs(model)
    problems += [
        f"layer {name!r} is {saved.get(name, 'absent')} in the file, {cfg} in the model"
        for name, cfg in target.items()
        if saved.get(name) != cfg
    ]
    problems += [f"layer {name!r} is {saved[name]} in the file, absent from the model" for name in saved.keys() - target.keys()]
    return problems


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by ``save_packed`` into ``model`` and return the packed model (eval mode).

    ``model`` is the architecture the file was saved from: either already packed (loaded in place), or
    the binarized float model (e.g. ``binarize_model(resnet18())``), which is packed first with the
    ``pack_model`` options recorded in the file (a new module; ``model`` itself is untouched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_packed expects the target nn.Module as second argument, got {type(model).__name__}."
        )
    tensors, header = read_packed(path)
    if packed_layers(model):
        target = model
    elif binary_layers(model):
        options = header["pack_options"]
        if options is None:
            raise _bad(path, "the file records no pack_model options, so a binarized model cannot be packed "
                             "like the saved one; pass the packed model instead")
        try:
            target = pack_model(model, **options)
        except TypeError as err:
            raise _bad(path, f"pack_options {options} are not accepted by this pack_model: {err}") from None
    else:
        raise ValueError(
            "load_packed needs the model's architecture with binary layers (binarize_model(...)) or a packed "
            "model; the given model has neither."
        )
    problems = _problems(tensors, header, target)
    if problems:
        raise _mismatch(path, problems)
    with torch.no_grad():
        for key, t in target.state_dict(keep_vars=True).items():
            t.copy_(tensors[key])
    return target.eval()
