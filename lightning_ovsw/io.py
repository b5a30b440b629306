"""Packed model files: ``save_packed`` / ``load_packed`` (design §3). Nothing is ever unpickled.

File format, version 1 (all integers little-endian)::

    offset 0   8 bytes   magic b"OVSWPACK"
    offset 8   uint32    format version (1)
    offset 12  uint64    H, length of the JSON header in bytes
    offset 20  uint32    CRC-32 of the header bytes
    offset 24  H bytes   header: UTF-8 JSON object (below)
    offset 24+H          payload: the raw bytes of every tensor, back to back, C order, little-endian

The header holds::

    {"format": "lightning-ovsw-packed", "version": 1,
     "tensors": {"<state_dict key>": {"dtype": "int32", "shape": [64, 3, 3, 2], "offset": 0, "nbytes": 1536},
                 ...},                      # offsets are relative to the payload start
     "payload_nbytes": int, "payload_sha256": "<hex>",
     "modules": {"<module name>": {"type": "PackedConv2d", "stride": [1, 1], ...}, ...},
     "metadata": {...}}                     # free JSON from the caller, plus library and torch versions

``tensors`` is the packed model's ``state_dict``: the bit-packed weights (int32 words), the folded
``scale`` / ``bias`` of every packed layer, and the parameters and buffers of the layers kept in full
precision. ``modules`` records each packed layer's configuration (stride, padding, ...), which tensor
shapes alone do not pin down, so a file is never loaded into a model that would compute something else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import lightning_ovsw
from lightning_ovsw.layers import BinaryLayer
from lightning_ovsw.pack import pack_model
from lightning_ovsw.packed import PackedConv2d, PackedLinear

MAGIC = b"OVSWPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQI")
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
_MODULE_FIELDS = {
    PackedConv2d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "pad_value",
    ),
    PackedLinear: ("in_features", "out_features", "bn_folded"),
}


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("packed model files are little-endian; this big-endian platform is not supported.")


def _module_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Configuration of every packed layer, JSON-ready (tuples become lists)."""
    configs = {}
    for name, m in model.named_modules():
        fields = _MODULE_FIELDS.get(type(m))
        if fields is not None:
            configs[name] = {"type": type(m).__name__} | {
                f: list(v) if isinstance(v, tuple) else v for f, v in ((f, getattr(m, f)) for f in fields)
            }
    return configs


def _float_layer_keys(model: nn.Module) -> set[str]:
    """State keys of the full-precision conv / linear layers (the tensors ``float_dtype`` may shrink)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d)) and not isinstance(m, BinaryLayer):
            keys.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
    return keys


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    float_dtype: torch.dtype | None = None,
) -> int:
    """Write a packed model (from ``pack_model``) to ``path``; return the file size in bytes.

    Args:
        metadata: JSON-serializable extra information stored in the header (e.g. the architecture name).
        float_dtype: store the weights of the layers kept in full precision (first conv, classifier,
            float shortcuts) as ``torch.float16`` / ``torch.bfloat16`` to shrink the file (lossy; they
            are cast back to the target model's dtype on load). Norm layers and the packed layers'
            folded constants are always stored as they are.
    """
    _check_little_endian()
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_packed expects an nn.Module, got {type(model).__name__}.")
    configs = _module_configs(model)
    if not configs:
        raise ValueError(
            "save_packed expects a packed model; call lightning_ovsw.pack.pack_model(model) first."
        )
    if float_dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"float_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {float_dtype}."
        )
    try:
        meta = json.loads(json.dumps(dict(metadata or {})))
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serializable: {err}") from None
    meta |= {"lightning_ovsw": lightning_ovsw.__version__, "torch": torch.__version__}
    shrink = _float_layer_keys(model) if float_dtype is not None else set()

    tensors: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key in shrink and t.is_floating_point():
            t = t.to(float_dtype)
        data = bytes(t.reshape(-1).clone().view(torch.uint8).untyped_storage()) if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which packed model files do not support.")
        tensors[key] = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = json.dumps(
        {
            "format": "lightning-ovsw-packed",
            "version": FORMAT_VERSION,
            "tensors": tensors,
            "payload_nbytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "modules": configs,
            "metadata": meta,
        },
        separators=(",", ":"),
    ).encode()
    with open(path, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
        f.write(header)
        f.write(payload)
    return _PREFIX.size + len(header) + len(payload)


def _corrupt(path: str | os.PathLike, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)} is corrupted ({why}); re-create it with save_packed.")


def _truncated(path: str | os.PathLike, why: str) -> ValueError:
    return ValueError(
        f"{os.fspath(path)} is truncated ({why}); the copy or download was incomplete: copy it again "
        "or re-create it with save_packed."
    )


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a packed model file: ``(state tensors, header)``. Raises ``ValueError`` if bad."""
    _check_little_endian()
    with open(path, "rb") as f:
        blob = f.read()
    if blob[: len(MAGIC)] != MAGIC[: len(blob)]:
        raise ValueError(
            f"{os.fspath(path)} is not a lightning-ovsw packed model file (wrong magic bytes); "
            "write one with lightning_ovsw.io.save_packed."
        )
    if len(blob) < _PREFIX.size:
        raise _truncated(path, f"{len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    _, version, header_len, header_crc = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)} uses packed-file format version {version}; this lightning-ovsw "
            f"({lightning_ovsw.__version__}) reads version {FORMAT_VERSION}. Install the lightning-ovsw "
            "version that wrote it, or re-save the model with this one."
        )
    start = _PREFIX.size + header_len
    if len(blob) < start:
        got = len(blob) - _PREFIX.size
        raise _truncated(path, f"the header needs {header_len} bytes, only {got} present")
    header_bytes = blob[_PREFIX.size : start]
    if zlib.crc32(header_bytes) != header_crc:
        raise _corrupt(path, "header checksum mismatch")
    try:
        header = json.loads(header_bytes)
        tensors_info = header["tensors"]
        payload_nbytes = int(header["payload_nbytes"])
        payload_sha = header["payload_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupt(path, f"unreadable header: {err}") from None
    payload = blob[start:]
    if len(payload) < payload_nbytes:
        raise _truncated(path, f"payload has {len(payload)} of {payload_nbytes} bytes")
    if len(payload) > payload_nbytes:
        raise _corrupt(path, f"{len(payload) - payload_nbytes} unexpected bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != payload_sha:
        raise _corrupt(path, "payload checksum mismatch")
    tensors = {}
    for key, info in tensors_info.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            lo, n = int(info["offset"]), int(info["nbytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"bad entry for tensor {key!r}: {err}") from None
        numel = 1
        for s in shape:
            numel *= s
        if lo < 0 or lo + n > payload_nbytes or n != numel * dtype.itemsize:
            raise _corrupt(path, f"tensor {key!r} does not fit the payload")
        raw = bytearray(payload[lo : lo + n])
        flat = torch.frombuffer(raw, dtype=dtype) if n else torch.empty(0, dtype=dtype)
        tensors[key] = flat.reshape(shape)
    return tensors, header


def _mismatch(path: str | os.PathLike, problems: list[str]) -> ValueError:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    return ValueError(
        f"{os.fspath(path)} does not match the target model: {shown}. Pass the same architecture (and "
        "binarize_model options) as the model that was saved."
    )


def _problems(tensors: Mapping[str, Tensor], header: Mapping[str, Any], model: nn.Module) -> list[str]:
    state = model.state_dict()
    problems = [f"missing key {k!r}" for k in state if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in state]
    problems += [
        f"{k!r} has shape {list(tensors[k].shape)} in the file, {list(state[k].shape)} in the model"
        for k in state
        if k in tensors and tensors[k].shape != state[k].shape
    ]
    saved, target = header.get("modules", {}), _module_configs(model)
    problems += [
        f"layer {name!r} is {saved.get(name)} in the file, {cfg} in the model"
        for name, cfg in target.items()
        if saved.get(name) != cfg
    ]
    return problems


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by ``save_packed`` into ``model`` and return the packed model (eval mode).

    ``model`` is the architecture the file was saved from: either already packed (loaded in place), or
    the binarized float model (e.g. ``binarize_model(resnet18())``), which is packed first (a new
    module; ``model`` itself is untouched), with or without BatchNorm folding, as the file says.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_packed expects the target nn.Module as second argument, got {type(model).__name__}."
        )
    tensors, header = read_packed(path)
    if _module_configs(model):
        target, problems = model, _problems(tensors, header, model)
    elif any(isinstance(m, BinaryLayer) for m in model.modules()):
        target = pack_model(model)
        problems = _problems(tensors, header, target)
        if problems:  # saved without BatchNorm folding?
            unfolded = pack_model(model, fold_batchnorm=False)
            if not _problems(tensors, header, unfolded):
                target, problems = unfolded, []
    else:
        raise ValueError(
            "load_packed needs the model's architecture with binary layers (binarize_model(...)) or a packed "
            "model; the given model has neither."
        )
    if problems:
        raise _mismatch(path, problems)
    with torch.no_grad():
        for key, t in target.state_dict(keep_vars=True).items():
            t.copy_(tensors[key])
    return target.eval()
