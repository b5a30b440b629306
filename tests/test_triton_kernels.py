"""Triton packed kernels against ``kernels/reference.py`` (the oracle: unpack to +-1, float matmul/conv).

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) on small shapes. Every mode
is pinned to one small config: popcount, int8 / fp8 ``tl.dot`` on bits unpacked in registers, and the
two-pass int8 / fp8 paths (unpack to bytes, then a dense ``tl.dot`` kernel); the default autotuned path
is checked too. Integer results must be bit-exact; the float epilogue must agree within one rounding of
the output dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from lightning_ovsw.kernels import reference  # noqa: E402
from lightning_ovsw.kernels.triton import conv, dense, gemm, launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = [launch.POPC, launch.DOT_I8, launch.DOT_F8, launch.DENSE_I8, launch.DENSE_F8]
if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    MODES = [m for m in MODES if m not in (launch.DOT_F8, launch.DENSE_F8)]
# one small pinned config per mode (the configs the interpreter autotunes over)
GEMM_CONFIGS = {**gemm.INTERPRET_CONFIGS, **dense.INTERPRET_CONFIGS}
CONV_CONFIGS = {**conv.INTERPRET_CONFIGS, **dense.INTERPRET_CONFIGS}
HYP = settings(max_examples=100, deadline=None, derandomize=True)
# one rounding of each output dtype (the interpreter truncates to bf16, the GPU rounds to nearest)
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2**-7, 1e-2), torch.float16: (2**-10, 1e-3)}


def signs(*shape: int) -> torch.Tensor:
    """Random floats with exact zeros of both signs, which must pack as +1."""
    x = torch.randn(*shape, device=DEVICE)
    x[torch.rand(shape, device=DEVICE) < 0.05] = 0.0
    x[torch.rand(shape, device=DEVICE) < 0.05] = -0.0
    return x


def packed(*shape: int) -> torch.Tensor:
    return reference.sign_pack(signs(*shape))


# --------------------------------------------------------------------------- sign-and-pack


@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sign_pack_matches_reference(k: int, dtype: torch.dtype) -> None:
    x = signs(3, 5, k).to(dtype)
    out = launch.triton_sign_pack(x)
    assert out.dtype == torch.int32 and out.shape == (3, 5, reference.num_words(k))
    assert torch.equal(out, reference.sign_pack(x))


def test_sign_pack_special_values_and_strided_input() -> None:
    x = torch.tensor([[-0.0, 0.0, -1e-30, float("inf"), float("-inf"), float("nan"), 1.0, -2.0]] * 3)
    x = x.to(DEVICE)
    out = launch.triton_sign_pack(x)
    # bits (LSB first): -0.0 -> 0, 0 -> 0, -1e-30 -> 1, inf -> 0, -inf -> 1, nan -> 0, 1 -> 0, -2 -> 1
    assert out.tolist() == [[0b10010100]] * 3
    wide = signs(40, 70)
    assert torch.equal(launch.triton_sign_pack(wide[::3, 1:66]), reference.sign_pack(wide[::3, 1:66]))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c", [1, 32, 45])
def test_sign_pack_nchw_to_nhwc(c: int, channels_last: bool) -> None:
    x = signs(2, c, 5, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert torch.equal(launch.triton_sign_pack_nchw(x), reference.sign_pack(x.permute(0, 2, 3, 1)))


# --------------------------------------------------------------------------- packed GEMM / linear


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 65, 300])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (17, 5), (33, 40)])
def test_packed_gemm_exact(mode: int, k: int, m: int, n: int) -> None:
    a, b = packed(m, k), packed(n, k)
    out = launch.triton_packed_linear(a, b, k, config=GEMM_CONFIGS[mode])
    assert out.dtype == torch.int32
    assert torch.equal(out, reference.packed_gemm(a, b, k))


def test_packed_gemm_extremes_all_modes() -> None:
    """All-equal and all-opposite signs: |dot| = K, the largest accumulations."""
    k = 300
    ones = reference.sign_pack(torch.ones(20, k, device=DEVICE))
    neg = reference.sign_pack(-torch.ones(18, k, device=DEVICE))
    for mode in MODES:
        out = launch.triton_packed_linear(ones, torch.cat([ones[:9], neg[:9]]), k, config=GEMM_CONFIGS[mode])
        assert (out[:, :9] == k).all() and (out[:, 9:] == -k).all()


@HYP
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 300), mode=st.sampled_from(MODES))
def test_packed_gemm_random_shapes(m: int, n: int, k: int, mode: int) -> None:
    a, b = packed(m, k), packed(n, k)
    assert torch.equal(launch.triton_packed_linear(a, b, k, mode=mode), reference.packed_gemm(a, b, k))


def test_packed_linear_autotuned_default_and_batch_dims() -> None:
    a, b = packed(2, 3, 70), packed(9, 70)
    out = launch.triton_packed_linear(a, b, 70)
    assert out.shape == (2, 3, 9)
    assert torch.equal(out, reference.packed_gemm(a, b, 70))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", ["scale", "bias", "residual", "all", "none"])
def test_packed_linear_epilogue(mode: int, out_dtype: torch.dtype | None, parts: str) -> None:
    m, n, k = 19, 23, 70
    a, b = packed(m, k), packed(n, k)
    scale = torch.rand(n, device=DEVICE) if parts in ("scale", "all") else None
    bias = torch.randn(n, device=DEVICE) if parts in ("bias", "all") else None
    residual = torch.randn(m, n, device=DEVICE).to(torch.bfloat16) if parts in ("residual", "all") else None
    out = launch.triton_packed_linear(a, b, k, scale, bias, residual, out_dtype, config=GEMM_CONFIGS[mode])
    ref = reference.packed_linear(a, b, k, scale, bias, residual, out_dtype)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.int32:
        assert torch.equal(out, ref)
    else:
        rtol, atol = TOL[ref.dtype]
        torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- packed conv2d


def check_conv(n, c, h, w, cout, kh, kw, stride, padding, dilation, pad_value, mode, **epilogue) -> None:
    xb, wb = packed(n, h, w, c), packed(cout, kh, kw, c)
    args = (xb, wb, c, stride, padding, dilation, pad_value)
    ref = reference.packed_conv2d(*args, **epilogue)
    out = launch.triton_packed_conv2d(*args, **epilogue, config=CONV_CONFIGS[mode])
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype == torch.int32:
        assert torch.equal(out, ref)
    else:
        rtol, atol = TOL[ref.dtype]
        torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pad_value", [0, 1])
@pytest.mark.parametrize(
    ("c", "k", "stride", "padding", "dilation"),
    [
        (40, 3, (1, 1), (1, 1), (1, 1)),  # ResNet 3x3, ragged channels (2 words, 24 padding bits)
        (64, 3, (2, 2), (1, 1), (1, 1)),  # downsampling 3x3
        (33, 1, (2, 2), (0, 0), (1, 1)),  # 1x1 downsample
        (5, 3, (1, 2), (2, 1), (2, 2)),  # dilation, mixed stride, padding wider than the kernel reach
        (31, 3, (1, 1), (0, 0), (1, 1)),  # no padding
    ],
)
def test_packed_conv2d_exact(mode, pad_value, c, k, stride, padding, dilation) -> None:
    check_conv(2, c, 6, 5, 9, k, k, stride, padding, dilation, pad_value, mode)


def test_packed_conv2d_rectangular_kernel_and_all_padding() -> None:
    """A 1x3 kernel, and a 3x3 kernel on a 1x1 input where every tap but the centre is padding."""
    for mode in MODES:
        check_conv(1, 17, 4, 7, 5, 1, 3, (1, 1), (0, 1), (1, 1), 0, mode)
        for pad_value in (0, 1):
            check_conv(3, 32, 1, 1, 18, 3, 3, (1, 1), (1, 1), (1, 1), pad_value, mode)


@HYP
@given(
    n=st.integers(1, 2), c=st.integers(1, 70), hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    cout=st.integers(1, 20), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
    padding=st.integers(0, 2), dilation=st.sampled_from([1, 2]), pad_value=st.sampled_from([0, 1]),
    mode=st.sampled_from(MODES),
)
def test_packed_conv2d_random_shapes(n, c, hw, cout, k, stride, padding, dilation, pad_value, mode) -> None:
    h, w = hw
    if (h + 2 * padding - dilation * (k - 1) - 1) < 0 or (w + 2 * padding - dilation * (k - 1) - 1) < 0:
        h, w = h + dilation * (k - 1), w + dilation * (k - 1)
    check_conv(n, c, h, w, cout, k, k, (stride, stride), (padding, padding), (dilation, dilation), pad_value,
               mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_conv2d_epilogue(mode: int, out_dtype: torch.dtype) -> None:
    """alpha * conv + folded BatchNorm bias + NHWC residual, as a ResNet block computes it."""
    n, c, h, w, cout = 2, 40, 5, 4, 12
    residual = torch.randn(n, h, w, cout, device=DEVICE)
    check_conv(n, c, h, w, cout, 3, 3, (1, 1), (1, 1), (1, 1), 0, mode, scale=torch.rand(cout, device=DEVICE),
               bias=torch.randn(cout, device=DEVICE), residual=residual, out_dtype=out_dtype)


def test_packed_conv2d_autotuned_default_and_int_arguments() -> None:
    xb, wb = packed(1, 5, 5, 20), packed(7, 3, 3, 20)
    out = launch.triton_packed_conv2d(xb, wb, 20, 1, 1, 1, 1)
    assert torch.equal(out, reference.packed_conv2d(xb, wb, 20, (1, 1), (1, 1), (1, 1), 1))


# --------------------------------------------------------------------------- CUDA graph capture guard


def test_capture_needs_a_warmed_shape(monkeypatch) -> None:
    """While a stream captures, a shape that never ran eagerly is refused (it would autotune and time
    kernels); after one eager run the same shape launches from the cache and stays exact."""
    xb, wb = packed(2, 6, 6, 50), packed(9, 3, 3, 50)
    a, b = packed(11, 70), packed(13, 70)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warmup"):
        launch.triton_packed_conv2d(xb, wb, 50, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="warmup"):
        launch.triton_packed_linear(a, b, 70, out_dtype=torch.float16)
    monkeypatch.setattr(launch, "_capturing", lambda device: False)
    launch.triton_packed_conv2d(xb, wb, 50, 1, 1, 1, 0)
    launch.triton_packed_linear(a, b, 70, out_dtype=torch.float16)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    out = launch.triton_packed_conv2d(xb, wb, 50, 1, 1, 1, 0)
    assert torch.equal(out, reference.packed_conv2d(xb, wb, 50, (1, 1), (1, 1), (1, 1), 0))
    lin = launch.triton_packed_linear(a, b, 70, out_dtype=torch.float16)
    assert torch.equal(lin, reference.packed_linear(a, b, 70, out_dtype=torch.float16))
    with pytest.raises(RuntimeError, match="warmup"):  # another output dtype is another tuning key
        launch.triton_packed_linear(a, b, 70, out_dtype=torch.bfloat16)
    # a pinned config needs no tuning
    pinned = launch.triton_packed_linear(a, b, 70, config=gemm.INTERPRET_CONFIGS[launch.POPC])
    assert torch.equal(pinned, reference.packed_gemm(a, b, 70))


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_with_clear_errors() -> None:
    a, b = packed(4, 40), packed(3, 40)
    with pytest.raises(TypeError, match="int32"):
        launch.triton_packed_linear(a.float(), b, 40)
    with pytest.raises(ValueError, match="words per row"):
        launch.triton_packed_linear(a, b, 70)
    with pytest.raises(ValueError, match="positive int"):
        launch.triton_packed_linear(a, b, 0)
    with pytest.raises(ValueError, match="one value per output channel"):
        launch.triton_packed_linear(a, b, 40, scale=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        launch.triton_packed_linear(a, b, 40, residual=torch.ones(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype"):
        launch.triton_packed_linear(a, b, 40, out_dtype=torch.int64)
    with pytest.raises(ValueError, match="mode"):
        launch.triton_packed_linear(a, b, 40, mode=7)
    with pytest.raises(TypeError, match="floating point"):
        launch.triton_sign_pack(torch.ones(3, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="non-empty"):
        launch.triton_sign_pack(torch.ones(3, 0, device=DEVICE))
    xb, wb = packed(1, 4, 4, 40), packed(2, 3, 3, 40)
    with pytest.raises(ValueError, match="pad_value"):
        launch.triton_packed_conv2d(xb, wb, 40, 1, 1, 1, 2)
    with pytest.raises(ValueError, match="words per pixel"):
        launch.triton_packed_conv2d(xb, wb, 80, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        launch.triton_packed_conv2d(xb, wb, 40, 0, 1, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        launch.triton_packed_conv2d(xb, packed(2, 7, 7, 40), 40, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="4 dims"):
        launch.triton_packed_conv2d(xb[0], wb, 40, 1, 1, 1, 0)


# --------------------------------------------------------------------------- GPU build (no GPU needed)


def test_every_gpu_config_compiles_for_h100(tmp_path) -> None:
    """Every autotune config of every kernel compiles to an sm_90 cubin with the installed Triton (in a
    process without the interpreter, with an empty kernel cache so that nothing is skipped)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lightning_ovsw.kernels.triton.aot_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 of the configs failed" in proc.stdout
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") >= 30
