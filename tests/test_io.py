"""Packed model files: round trip against the in-memory packed model, and every kind of bad file."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from test_pack import SmallNet, with_bn_statistics
from torch import nn

from lightning_ovsw.io import MAGIC, load_packed, read_packed, save_packed
from lightning_ovsw.pack import pack_model
from lightning_ovsw.packed import PackedConv2d


@pytest.fixture
def trained():
    """A binarized model with non-trivial BN statistics, its packed twin and an input."""
    x = torch.randn(3, 3, 11, 11)
    model = with_bn_statistics(SmallNet(pad_value=1, stride=2, dilation=1, conv_bias=True), x)
    return model, pack_model(model), x


def fresh_model() -> nn.Module:
    """Same architecture, other (random) weights: what a user builds before loading a file."""
    torch.manual_seed(123)
    return SmallNet(pad_value=1, stride=2, dilation=1, conv_bias=True)


def _split(path):
    blob = path.read_bytes()
    _, version, hlen, _ = struct.unpack_from("<8sIQI", blob)
    return blob, version, 24, 24 + hlen


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
    assert header["metadata"]["arch"] == "SmallNet" and header["version"] == 1
    assert tensors["conv1.weight_bits"].dtype == torch.int32


def test_file_holds_one_bit_per_binary_weight(tmp_path, trained):
    _, packed, _ = trained
    path = tmp_path / "m.ovsw"
    save_packed(packed, path)
    blob, _, _, start = _split(path)
    bits = sum(m.weight_bits.numel() * 32 for m in packed.modules() if isinstance(m, PackedConv2d))
    # conv1 37 ch -> 2 words, conv2 40 -> 2, conv3 33 -> 2: bits are padded to words, never bytes per weight
    assert bits == 32 * (40 * 9 * 2 + 33 * 3 * 2 + 70 * 2)
    assert len(blob) - start == sum(t.numel() * t.element_size() for t in packed.state_dict().values())


def test_float_dtype_shrinks_only_full_precision_layers(tmp_path, trained):
    model, packed, x = trained
    full, half = tmp_path / "full.ovsw", tmp_path / "half.ovsw"
    save_packed(packed, full)
    save_packed(packed, half, float_dtype=torch.float16)
    tensors, _ = read_packed(half)
    assert tensors["stem.weight"].dtype == torch.float16 and tensors["fc2.weight"].dtype == torch.float16
    assert tensors["conv1.scale"].dtype == torch.float32 and tensors["conv1.weight_bits"].dtype == torch.int32
    keys = ("stem.weight", "stem.bias", "fc2.weight", "fc2.bias")
    saved = 2 * sum(packed.state_dict()[k].numel() for k in keys)
    assert full.stat().st_size - half.stat().st_size == pytest.approx(saved, abs=64)  # header differs a bit
    loaded = load_packed(half, fresh_model())
    assert loaded.stem.weight.dtype == torch.float32
    with torch.no_grad():
        for key in keys:  # the packed model with those weights rounded to float16 is what was stored
            packed.get_parameter(key).copy_(packed.get_parameter(key).half())
        assert torch.equal(loaded(x), packed(x))


def test_truncated_files_are_rejected(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path)
    blob, _, hstart, pstart = _split(path)
    for cut in (4, hstart - 1, hstart + 10, pstart + 5, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="truncated.*copy it again"):
            read_packed(path)


def test_corrupted_files_are_rejected(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path)
    blob, _, hstart, pstart = _split(path)
    for pos, what in ((pstart + 100, "payload checksum"), (hstart + 3, "header checksum")):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=f"corrupted \\({what}.*re-create it with save_packed"):
            load_packed(path, fresh_model())
    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="corrupted.*unexpected bytes"):
        read_packed(path)


def test_wrong_magic_and_version_are_rejected(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path)
    blob = path.read_bytes()
    path.write_bytes(b"PK\x03\x04" + blob[4:])  # e.g. a torch.save zip
    with pytest.raises(ValueError, match="not a lightning-ovsw packed model file.*save_packed"):
        read_packed(path)
    path.write_bytes(blob[:8] + struct.pack("<I", 2) + blob[12:])
    with pytest.raises(ValueError, match="format version 2.*reads version 1"):
        read_packed(path)


def test_header_describing_tensors_outside_the_payload_is_rejected(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path)
    blob, _, hstart, pstart = _split(path)
    header = json.loads(blob[hstart:pstart])
    header["tensors"]["conv1.scale"]["offset"] = header["payload_nbytes"]
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<IQI", 1, len(raw), zlib.crc32(raw)) + raw + blob[pstart:])
    with pytest.raises(ValueError, match="corrupted.*conv1.scale"):
        read_packed(path)


def test_mismatched_target_models_are_rejected(tmp_path, trained):
    path = tmp_path / "m.ovsw"
    save_packed(trained[1], path)
    with pytest.raises(ValueError, match="does not match.*conv1.weight_bits.*shape"):
        other = fresh_model()
        other.conv1 = type(other.conv1)(37, 48, 3, stride=2, padding=2, pad_value=1)
        load_packed(path, other)
    with pytest.raises(ValueError, match="does not match.*layer 'conv1'.*'stride': \\[2, 2\\]"):
        load_packed(path, SmallNet(pad_value=1, stride=1, dilation=1, conv_bias=True))
    with pytest.raises(ValueError, match="does not match.*pad_value"):
        load_packed(path, SmallNet(pad_value=0, stride=2, dilation=1, conv_bias=True))
    with pytest.raises(ValueError, match="does not match.*missing key 'bn1.running_mean'"):
        load_packed(path, pack_model(fresh_model(), fold_batchnorm=False))
    with pytest.raises(ValueError, match="neither"):
        load_packed(path, nn.Linear(3, 3))


def test_save_rejects_unpacked_models(tmp_path, trained):
    with pytest.raises(ValueError, match="pack_model"):
        save_packed(trained[0], tmp_path / "m.ovsw")
    with pytest.raises(ValueError, match="JSON"):
        save_packed(trained[1], tmp_path / "m.ovsw", metadata={"x": object()})


def test_round_trip_of_a_fused_zoo_model(tmp_path):
    from lightning_ovsw.models import resnet20_1w1a

    x = torch.randn(2, 3, 16, 16)
    packed = pack_model(with_bn_statistics(resnet20_1w1a(), x))
    assert isinstance(packed, torch.fx.GraphModule)
    save_packed(packed, tmp_path / "r20.ovsw")
    loaded = load_packed(tmp_path / "r20.ovsw", resnet20_1w1a())
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
