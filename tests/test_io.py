"""Packed model files: exact round trips, the recorded pack options, and every kind of bad file.

The malformed files are written by hand here, from the layout documented in ``lightning_ovsw.io``
(the safetensors prefix and header, the metadata checksum rule), not with the module's helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pack import SmallNet, with_bn_statistics
from torch import nn

import lightning_ovsw.io as ovsw_io
from lightning_ovsw.io import MAGIC, load_packed, read_packed, save_packed
from lightning_ovsw.packed_layers import PackedConv2d
from lightning_ovsw.packing import pack_model

BITS = "conv1.weight_bits"


@pytest.fixture
def trained():
    """A binarized model with non-trivial BN statistics, its packed twin and an input."""
    x = torch.randn(3, 3, 11, 11)
    model = with_bn_statistics(SmallNet(pad_value=1, stride=2, dilation=1, conv_bias=True), x)
    return model, pack_model(model), x


@pytest.fixture
def saved(tmp_path, trained):
    """A valid file of the packed SmallNet, with user metadata."""
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path, metadata={"arch": "SmallNet", "note": "abcdef"})
    return path


def fresh_model() -> nn.Module:
    """Same architecture, other (random) weights: what a user builds before loading a file."""
    torch.manual_seed(123)
    return SmallNet(pad_value=1, stride=2, dilation=1, conv_bias=True)


def split(path) -> tuple[dict, bytes]:
    """``(header, tensor bytes)`` of a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write(path, header: dict | None, payload: bytes, raw: bytes | None = None) -> None:
    """Write a safetensors file from a header (or raw header bytes) and the tensor bytes."""
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def resign(header: dict) -> dict:
    """Recompute the metadata checksum after a deliberate edit (the rule in the format docs)."""
    meta = header["__metadata__"]
    items = sorted([k, v] for k, v in meta.items() if k != "checksums")
    sums = json.loads(meta["checksums"])
    sums["metadata"] = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    meta["checksums"] = json.dumps(sums)
    return header


@pytest.mark.parametrize("fold", [True, False])
def test_round_trip_into_unpacked_and_packed_targets(tmp_path, trained, fold):
    model, _, x = trained
    packed = pack_model(model, fold_batchnorm=fold)
    path = tmp_path / "model.ovsw"
    size = save_packed(packed, path, metadata={"arch": "SmallNet"})
    assert size == path.stat().st_size
    with torch.no_grad():
        want = packed(x)
        loaded = load_packed(path, fresh_model())  # binarized float model: packed on load as the file says
        assert torch.equal(loaded(x), want)
        target = pack_model(fresh_model(), fold_batchnorm=fold)
        assert load_packed(path, target) is target
        assert torch.equal(target(x), want)
    for key, t in packed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t) and loaded.state_dict()[key].dtype == t.dtype
    tensors, header = read_packed(path)
    assert header["metadata"] == {"arch": "SmallNet"} and header["version"] == 2
    assert header["format"] == "lightning-ovsw-packed" and header["versions"]["torch"] == torch.__version__
    assert tensors[BITS].dtype == torch.int32


def test_zoo_model_round_trip_is_bit_exact_and_input_dependent(tmp_path):
    from lightning_ovsw.models import resnet20_1w1a

    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    packed = pack_model(with_bn_statistics(resnet20_1w1a(), x1))
    assert isinstance(packed, torch.fx.GraphModule)
    save_packed(packed, tmp_path / "r20.ovsw")
    loaded = load_packed(tmp_path / "r20.ovsw", resnet20_1w1a())
    with torch.no_grad():
        y1, y2 = packed(x1), packed(x2)
        assert not torch.equal(y1, y2)  # the model reads its input, so equal outputs below mean something
        assert torch.equal(loaded(x1), y1) and torch.equal(loaded(x2), y2)
    for key, t in packed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t)


def test_file_is_plain_safetensors_with_one_bit_per_binary_weight(trained, saved):
    _, packed, _ = trained
    assert set(load_file(saved)) == set(packed.state_dict())  # any safetensors reader reads it
    header, payload = split(saved)
    assert header["__metadata__"]["format"] == "lightning-ovsw-packed"
    assert header["__metadata__"]["format_version"] == "2"
    bits = sum(m.weight_bits.numel() * 32 for m in packed.modules() if isinstance(m, PackedConv2d))
    # conv1 37 ch -> 2 words, conv2 40 -> 2, conv3 33 -> 2: bits are padded to words, never bytes per weight
    assert bits == 32 * (40 * 9 * 2 + 33 * 3 * 2 + 70 * 2)
    assert len(payload) == sum(t.numel() * t.element_size() for t in packed.state_dict().values())


def test_float_dtype_shrinks_only_full_precision_layers(tmp_path, trained):
    _, packed, x = trained
    full, half = tmp_path / "full.ovsw", tmp_path / "half.ovsw"
    save_packed(packed, full)
    save_packed(packed, half, float_dtype=torch.float16)
    tensors, header = read_packed(half)
    assert header["float_dtype"] == "float16"
    assert tensors["stem.weight"].dtype == torch.float16 and tensors["fc2.weight"].dtype == torch.float16
    assert tensors["conv1.scale"].dtype == torch.float32 and tensors[BITS].dtype == torch.int32
    keys = ("stem.weight", "stem.bias", "fc2.weight", "fc2.bias")
    saved_bytes = 2 * sum(packed.state_dict()[k].numel() for k in keys)
    assert full.stat().st_size - half.stat().st_size == pytest.approx(saved_bytes, abs=64)  # header differs
    loaded = load_packed(half, fresh_model())
    assert loaded.stem.weight.dtype == torch.float32
    with torch.no_grad():
        for key in keys:  # the packed model with those weights rounded to float16 is what was stored
            packed.get_parameter(key).copy_(packed.get_parameter(key).half())
        assert torch.equal(loaded(x), packed(x))
    head, payload = split(half)  # the same tensors without the float_dtype record: refused, not converted
    head["__metadata__"]["float_dtype"] = "null"
    write(half, resign(head), payload)
    with pytest.raises(ValueError, match="does not match.*'stem.weight' has dtype torch.float16 in the file"):
        load_packed(half, fresh_model())


def _last(header: dict) -> str:
    """The tensor stored last (largest offsets)."""
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def _edit(header: dict, case: str) -> bytes:
    """Raw header bytes for one malformed case."""
    meta, last = header["__metadata__"], _last(header)
    sentinel = '"@@"'
    if case == "negative shape":
        header[BITS]["shape"][0] = -header[BITS]["shape"][0]
    elif case == "entry is a list":
        header[BITS] = []
    elif case == "1e400 in shape":
        header[BITS]["shape"][0] = "@@"
        return json.dumps(header).replace(sentinel, "1e400").encode()
    elif case == "1e400 in data_offsets":
        header[BITS]["data_offsets"][1] = "@@"
        return json.dumps(header).replace(sentinel, "1e400").encode()
    elif case == "1e400 in pack_options":
        meta["pack_options"] = '{"fold_batchnorm": 1e400}'
    elif case == "NaN in modules":
        meta["modules"] = '{"conv1": {"stride": NaN}}'
    elif case == "deeply nested header":
        header[BITS]["shape"] = "@@"
        return json.dumps(header).replace(sentinel, _nested()).encode()
    elif case == "deeply nested metadata":
        meta["user_metadata"] = _nested()
    elif case == "non-UTF-8":
        return json.dumps(header).encode().replace(b"abcdef", b"abc\xffef")
    elif case == "unknown dtype":
        header[BITS]["dtype"] = "Q9"
    elif case == "unsupported dtype":
        header[BITS]["dtype"] = "F8_E4M3"
    elif case == "overlapping offsets":
        header[last]["data_offsets"] = [o - 4 for o in header[last]["data_offsets"]]
    elif case == "out-of-range offsets":
        header[last]["data_offsets"] = [o + 4096 for o in header[last]["data_offsets"]]
    elif case == "offsets span the wrong size":
        header[BITS]["data_offsets"][1] += 4
    elif case == "duplicate key":
        text = json.dumps(header)
        entry = json.dumps({BITS: header[BITS]})[1:-1]
        return text.replace("{", "{" + entry + ", ", 1).encode()
    elif case == "header is a list":
        return b"[1, 2]"
    elif case == "metadata value not a string":
        meta["modules"] = {}
    elif case == "metadata key missing":
        del meta["checksums"]
    elif case == "metadata key unknown":
        meta["extra"] = "1"
    elif case == "modules is a list":
        meta["modules"] = "[]"
    elif case == "modules entry not an object":
        meta["modules"] = '{"conv1": 5}'
    elif case == "pack_options is a list":
        meta["pack_options"] = "[]"
    elif case == "float_dtype unknown":
        meta["float_dtype"] = '"int8"'
    elif case == "size overflow":  # only safetensors' own check catches this one
        end = header[last]["data_offsets"][1]
        header["z"] = {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [end, end]}
        sums = json.loads(meta["checksums"])
        sums["tensors"]["z"] = hashlib.sha256(b"").hexdigest()
        meta["checksums"] = json.dumps(sums)
        resign(header)
    elif case == "checksums incomplete":
        meta["checksums"] = json.dumps({"tensors": {}, "metadata": "0" * 64})
    else:
        raise AssertionError(case)
    return json.dumps(header).encode()


MALFORMED = {
    "negative shape": f"'{BITS}': shape must be a list of non-negative integers, got \\[-",
    "entry is a list": f"'{BITS}' must be an object with exactly 'dtype', 'shape' and 'data_offsets'",
    "1e400 in shape": f"'{BITS}': shape must be a list of non-negative integers, got \\[inf",
    "1e400 in data_offsets": f"'{BITS}': data_offsets must be \\[begin, end\\].*inf",
    "1e400 in pack_options": "'pack_options' must be null or an object of JSON scalars",
    "NaN in modules": "'modules' is not valid JSON: NaN is not JSON",
    "deeply nested header": "header is JSON nested too deeply",
    "deeply nested metadata": "'user_metadata' is JSON nested too deeply",
    "non-UTF-8": "header is not valid UTF-8",
    "unknown dtype": f"'{BITS}': dtype 'Q9' is not one of",
    "unsupported dtype": f"'{BITS}': dtype 'F8_E4M3' is not one of",
    "overlapping offsets": "data_offsets .* overlap the previous tensor",
    "out-of-range offsets": "data_offsets .* leave a gap",
    "offsets span the wrong size": f"'{BITS}': data_offsets .* span \\d+ bytes, dtype I32 and shape",
    "duplicate key": f"header is not valid JSON: duplicate key '{BITS}'",
    "header is a list": "header must be a JSON object, got list",
    "metadata value not a string": "__metadata__ 'modules' must be a string, got dict",
    "metadata key missing": "__metadata__ keys missing or unknown: \\['checksums'\\]",
    "metadata key unknown": "__metadata__ keys missing or unknown: \\['extra'\\]",
    "modules is a list": "__metadata__ 'modules' must be an object of layer configurations",
    "modules entry not an object": "__metadata__ 'modules' must be an object of layer configurations",
    "pack_options is a list": "__metadata__ 'pack_options' must be null or an object",
    "float_dtype unknown": "__metadata__ 'float_dtype' must be null or one of",
    "checksums incomplete": "__metadata__ 'checksums' must be",
    "size overflow": "safetensors refused the file: .*overflow computing buffer size from shape",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_header_names_the_field(saved, case):
    header, payload = split(saved)
    write(saved, None, payload, raw=_edit(header, case))
    with pytest.raises(ValueError, match=MALFORMED[case]) as err:
        load_packed(saved, fresh_model())
    assert str(saved) in str(err.value)


def test_header_length_is_checked_before_anything_is_read(saved):
    blob = saved.read_bytes()
    for n in (ovsw_io.MAX_HEADER_BYTES + 1, 2**63, 0):
        saved.write_bytes(struct.pack("<Q", n) + blob[8:])
        with pytest.raises(ValueError, match=f"header length says {n} bytes, outside 2..100000000"):
            read_packed(saved)


def test_a_large_foreign_file_is_refused_after_reading_its_prefix(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:  # 1 GiB of zeros, sparse on disk: header length 0
        f.truncate(2**30)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="header length says 0 bytes"):
            read_packed(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_foreign_and_old_files_are_refused(tmp_path, saved):
    zip_path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, zip_path)
    with pytest.raises(ValueError, match="header length says .* not a lightning-ovsw packed model"):
        read_packed(zip_path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, plain)
    with pytest.raises(ValueError, match="not a lightning-ovsw packed model file.*save_packed"):
        read_packed(plain)
    old = tmp_path / "old.ovsw"
    old.write_bytes(MAGIC + struct.pack("<IQI", 1, 2, 0) + b"{}")
    with pytest.raises(ValueError, match="format 1 \\(magic OVSWPACK\\).*save it again with this version's save_packed"):
        read_packed(old)
    header, payload = split(saved)
    header["__metadata__"]["format_version"] = "3"
    write(saved, header, payload)
    with pytest.raises(ValueError, match="format version '3'.*reads version 2"):
        read_packed(saved)


def test_truncated_files_are_rejected(saved):
    blob = saved.read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    for cut in (0, 4, 8 + n // 2, 8 + n, 8 + n + 5, len(blob) - 1):
        saved.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="truncated.*copy"):
            read_packed(saved)


def test_trailing_bytes_are_rejected(saved):
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="1 trailing bytes after the tensors"):
        read_packed(saved)


def test_corrupted_payload_and_metadata_fail_their_checksums(saved):
    blob = saved.read_bytes()
    (n,) = struct.unpack_from("<Q", blob)
    header, _ = split(saved)
    begin = header[BITS]["data_offsets"][0]
    bad = bytearray(blob)
    bad[8 + n + begin + 3] ^= 0x10
    saved.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=f"checksum mismatch for tensor '{BITS}'.*corrupted"):
        load_packed(saved, fresh_model())
    saved.write_bytes(blob.replace(b"abcdef", b"abcdeg"))  # a valid header, one letter of user metadata off
    with pytest.raises(ValueError, match="checksum mismatch for __metadata__.*corrupted"):
        read_packed(saved)


def test_non_regular_files_are_refused(tmp_path):
    for path, kind in (("/dev/zero", "a device"), (tmp_path, "a directory")):
        if os.path.exists(path):
            with pytest.raises(ValueError, match=f"not a regular file \\({kind}"):
                read_packed(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.ovsw"
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def read() -> None:
        try:
            read_packed(fifo)
        except BaseException as err:  # noqa: B036 (reported to the test thread)
            caught.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked opening or reading the FIFO: connect a writer and close it (EOF)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("read_packed blocked on a FIFO")
    assert len(caught) == 1 and isinstance(caught[0], ValueError)
    assert "not a regular file (a FIFO)" in str(caught[0])


def test_a_missing_path_raises_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nowhere.ovsw"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_packed(path, fresh_model())


def test_dtype_and_shape_are_checked_against_the_model(saved):
    header, payload = split(saved)
    header[BITS]["dtype"] = "F32"  # the same bytes declared as float32: readable, but not this model's
    write(saved, header, payload)
    assert read_packed(saved)[0][BITS].dtype == torch.float32
    with pytest.raises(ValueError, match=f"does not match.*'{BITS}' has dtype torch.float32 in the file, torch.int32"):
        load_packed(saved, fresh_model())
    header[BITS]["dtype"] = "I32"
    header[BITS]["shape"] = header[BITS]["shape"][::-1]  # same byte count, other shape
    write(saved, header, payload)
    with pytest.raises(ValueError, match=f"does not match.*'{BITS}' has shape"):
        load_packed(saved, fresh_model())


def test_mismatched_target_models_are_rejected(saved):
    with pytest.raises(ValueError, match=f"does not match.*{BITS}.*shape"):
        other = fresh_model()
        other.conv1 = type(other.conv1)(37, 48, 3, stride=2, padding=2, pad_value=1)
        load_packed(saved, other)
    with pytest.raises(ValueError, match="does not match.*layer 'conv1'.*'stride': \\[2, 2\\]"):
        load_packed(saved, SmallNet(pad_value=1, stride=1, dilation=1, conv_bias=True))
    with pytest.raises(ValueError, match="does not match.*pad_value"):
        load_packed(saved, SmallNet(pad_value=0, stride=2, dilation=1, conv_bias=True))
    folded_in_file = "does not match.*pack options are .*'fold_batchnorm': True.* in the file.*missing key 'bn1.weight'"
    with pytest.raises(ValueError, match=folded_in_file):
        load_packed(saved, pack_model(fresh_model(), fold_batchnorm=False))
    with pytest.raises(ValueError, match="neither"):
        load_packed(saved, nn.Linear(3, 3))


def test_user_metadata_and_library_keys_never_overwrite_each_other(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    user = {k: "mine" for k in ("format", "version", "modules", "pack_options", "checksums", "torch")}
    user["lightning_ovsw"] = {"nested": [1, 2]}
    save_packed(trained[1], path, metadata=user)
    tensors, header = read_packed(path)
    assert header["metadata"] == user
    assert header["format"] == "lightning-ovsw-packed" and header["version"] == 2
    assert header["versions"]["torch"] == torch.__version__ and "conv1" in header["modules"]
    assert header["pack_options"]["fold_batchnorm"] is True and set(header["checksums"]) == set(tensors)


def test_pack_options_are_recorded_and_used_by_load(tmp_path, trained, monkeypatch):
    model, _, x = trained
    options = {"fold_batchnorm": False, "fuse_residual": False, "fuse_activation": False}
    packed = pack_model(model, **options)
    assert packed.pack_options == options
    path = tmp_path / "m.ovsw"
    save_packed(packed, path)
    assert read_packed(path)[1]["pack_options"] == options
    calls = []

    def counting_pack_model(m, **kwargs):
        calls.append(kwargs)
        return pack_model(m, **kwargs)

    monkeypatch.setattr(ovsw_io, "pack_model", counting_pack_model)
    loaded = load_packed(path, fresh_model())
    assert calls == [options]  # packed once, exactly as saved: no second guess
    assert isinstance(loaded.bn1, nn.BatchNorm2d) and loaded.pack_options == options
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))


def test_a_file_without_pack_options_loads_only_into_a_packed_model(tmp_path, trained):
    _, packed, x = trained
    del packed.pack_options  # e.g. a packed model assembled by hand
    path = tmp_path / "m.ovsw"
    save_packed(packed, path)
    assert read_packed(path)[1]["pack_options"] is None
    with pytest.raises(ValueError, match="records no pack_model options.*pass the packed model"):
        load_packed(path, fresh_model())
    target = load_packed(path, pack_model(fresh_model()))
    with torch.no_grad():
        assert torch.equal(target(x), packed(x))


def test_tied_tensors_are_stored_once_each(tmp_path, trained):
    _, packed, x = trained
    packed.head = packed.fc2  # one module under two names: two state keys, one storage
    save_packed(packed, tmp_path / "m.ovsw")
    target = pack_model(fresh_model())
    target.head = target.fc2
    load_packed(tmp_path / "m.ovsw", target)
    with torch.no_grad():
        assert torch.equal(target(x), packed(x)) and torch.equal(target.head.weight, packed.fc2.weight)


def test_save_rejects_unpacked_models_and_bad_metadata(tmp_path, trained):
    with pytest.raises(ValueError, match="pack_model"):
        save_packed(trained[0], tmp_path / "m.ovsw")
    with pytest.raises(ValueError, match="JSON"):
        save_packed(trained[1], tmp_path / "m.ovsw", metadata={"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        save_packed(trained[1], tmp_path / "m.ovsw", metadata={"x": float("nan")})
