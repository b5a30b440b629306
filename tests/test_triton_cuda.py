"""Triton packed kernels on a CUDA GPU, compiled (not interpreted), at realistic sizes: an 8192 GEMM,
small batches through an 8192x8192 layer, every binary conv shape of ImageNet ResNet-18, and random
ragged shapes, in every inner-product mode through the real autotune configs. Skipped without CUDA.

The oracle is ``kernels/reference.py`` (unpack to +-1, float32 matmul / ``F.conv2d``: exact here).
``OVSW_CUDA_EXAMPLES`` sets the number of random shapes per property test (default 40; the time-boxed
``benchmarks/gpu_session.sh`` uses fewer: every new shape autotunes).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from lightning_ovsw.kernels import reference
    from lightning_ovsw.kernels.triton import launch as ops

    MODES = [None, ops.POPC, ops.DOT_I8, ops.DENSE_I8]
    if torch.cuda.get_device_capability() >= (8, 9):
        MODES += [ops.DOT_F8, ops.DENSE_F8]
else:
    MODES = []

EXAMPLES = int(os.environ.get("OVSW_CUDA_EXAMPLES", "40"))
# (H=W of the input, Cin, Cout, kernel, stride, padding) of every binary conv in torchvision's
# ResNet-18 at 224x224 (3x3 convs and the 1x1 stride-2 downsample convs; the 7x7 stem stays float).
RESNET18_CONVS = [
    (56, 64, 64, 3, 1, 1),
    (56, 64, 128, 3, 2, 1),
    (56, 64, 128, 1, 2, 0),
    (28, 128, 128, 3, 1, 1),
    (28, 128, 256, 3, 2, 1),
    (28, 128, 256, 1, 2, 0),
    (14, 256, 256, 3, 1, 1),
    (14, 256, 512, 3, 2, 1),
    (14, 256, 512, 1, 2, 0),
    (7, 512, 512, 3, 1, 1),
]


def packed(*shape: int) -> torch.Tensor:
    return reference.sign_pack(torch.randn(*shape, device="cuda"))


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 reference must not round through TF32 (+-1 sums are exact in fp32 only)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_gemm_8192_exact(mode) -> None:
    k = 8192
    a, b = packed(8192, k), packed(8192, k)
    out = ops.triton_packed_linear(a, b, k, mode=mode)
    assert torch.equal(out, reference.packed_gemm(a, b, k))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_gemm_extreme_sums_exact(mode) -> None:
    """|dot| = K = 8192 (all signs equal / opposite): fp8 partial sums must stay exact."""
    k = 8192
    ones = reference.sign_pack(torch.ones(256, k, device="cuda"))
    w = torch.cat([ones[:128], reference.sign_pack(-torch.ones(128, k, device="cuda"))])
    out = ops.triton_packed_linear(ones, w, k, mode=mode)
    assert (out[:, :128] == k).all() and (out[:, 128:] == -k).all()


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("batch", [1, 16])
def test_small_batch_linear_8192(mode, batch: int) -> None:
    k, n = 8192, 8192
    x, w = packed(batch, k), packed(n, k)
    scale, bias = torch.rand(n, device="cuda"), torch.randn(n, device="cuda")
    assert torch.equal(ops.triton_packed_linear(x, w, k, mode=mode), reference.packed_gemm(x, w, k))
    out = ops.triton_packed_linear(x, w, k, scale, bias, out_dtype=torch.bfloat16, mode=mode)
    ref = reference.packed_linear(x, w, k, scale, bias, out_dtype=torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("shape", RESNET18_CONVS, ids=lambda s: "x".join(map(str, s)))
def test_resnet18_conv_shapes_exact(mode, shape) -> None:
    hw, cin, cout, k, stride, padding = shape
    xb, wb = packed(4, hw, hw, cin), packed(cout, k, k, cin)
    for pad_value in (0, 1):
        args = (xb, wb, cin, (stride, stride), (padding, padding), (1, 1), pad_value)
        assert torch.equal(ops.triton_packed_conv2d(*args, mode=mode), reference.packed_conv2d(*args))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_conv_fused_residual_block_batch64(mode) -> None:
    """alpha, folded BN bias and the residual in bf16, as a ResNet-18 layer1 block computes them."""
    n, hw, c = 64, 56, 64
    xb, wb = packed(n, hw, hw, c), packed(c, 3, 3, c)
    scale, bias = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
    residual = torch.randn(n, hw, hw, c, device="cuda", dtype=torch.bfloat16)
    args = (xb, wb, c, (1, 1), (1, 1), (1, 1), 0, scale, bias, residual, torch.bfloat16)
    out = ops.triton_packed_conv2d(*args, mode=mode)
    ref = reference.packed_conv2d(*args)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-8, atol=2e-2)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 700), n=st.integers(1, 700), k=st.integers(1, 3000), mode=st.sampled_from(MODES or [0])
)
def test_gemm_random_ragged(m: int, n: int, k: int, mode) -> None:
    a, b = packed(m, k), packed(n, k)
    assert torch.equal(ops.triton_packed_linear(a, b, k, mode=mode), reference.packed_gemm(a, b, k))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 9), c=st.integers(1, 300), hw=st.integers(3, 30), cout=st.integers(1, 300),
    k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
    pad_value=st.sampled_from([0, 1]), mode=st.sampled_from(MODES or [0]),
)
def test_conv_random_ragged(n, c, hw, cout, k, stride, dilation, pad_value, mode) -> None:
    xb, wb = packed(n, hw, hw, c), packed(cout, k, k, c)
    args = (xb, wb, c, (stride, stride), (k // 2 * dilation,) * 2, (dilation, dilation), pad_value)
    assert torch.equal(ops.triton_packed_conv2d(*args, mode=mode), reference.packed_conv2d(*args))


def test_sign_pack_large() -> None:
    x = torch.randn(64, 256, 28, 28, device="cuda", dtype=torch.bfloat16)
    expect = reference.sign_pack(x.permute(0, 2, 3, 1))
    assert torch.equal(ops.triton_sign_pack_nchw(x), expect)
    assert torch.equal(ops.triton_sign_pack_nchw(x.to(memory_format=torch.channels_last)), expect)
    y = torch.randn(16, 8192 + 5, device="cuda")
    assert torch.equal(ops.triton_sign_pack(y), reference.sign_pack(y))


def test_cpu_tensors_rejected_when_compiled() -> None:
    with pytest.raises(ValueError, match="CUDA tensors"):
        bits = torch.zeros(2, 1, dtype=torch.int32)
        ops.triton_packed_linear(bits, bits, 3)


def test_packed_resnet_replays_in_a_cuda_graph() -> None:
    """After ``warmup`` (autotuning, two-pass timing) a packed ResNet-18 captures in a CUDA graph, and
    replays on new inputs equal the eager forward bit for bit (the same cached kernels run)."""
    from lightning_ovsw.models import resnet18_1w1a
    from lightning_ovsw.packed_layers import warmup
    from lightning_ovsw.packing import pack_model

    cl = torch.channels_last
    packed_model = pack_model(resnet18_1w1a(num_classes=10).cuda()).to(memory_format=cl)  # packed by Triton
    static = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=cl)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warmup(packed_model, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = packed_model(static)
    for _ in range(2):
        x = torch.randn_like(static)
        static.copy_(x)
        graph.replay()
        with torch.no_grad():
            expect = packed_model(x)
        torch.cuda.synchronize()
        assert torch.equal(static_out, expect)
