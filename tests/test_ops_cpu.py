"""The ``ovsw`` ops on CPU: each C++ microkernel family (forced in turn) against ``kernels/reference.py``.

Integer accumulators must be identical; the float epilogue too (the kernels round each step like the
reference: no FMA contraction). Also: 1 and 2 threads, fake kernels (``opcheck``, ``torch.export``),
the ISA override, the reference fallback when the extension is missing, and the input errors.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lightning_ovsw.kernels import cpu, ops
from lightning_ovsw.kernels import reference as ref

# the ``isa`` fixture's choice holds for all examples of a test, as intended
HYP = settings(max_examples=80, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
RAGGED_K = [1, 31, 32, 33, 63, 64, 65, 200, 577]
# the ISAs of this machine's architecture: off aarch64 the NEON kernels are tested by the core's driver under
# qemu-aarch64 (.ci/cpu_core.sh) instead of being skipped here; on an aarch64 machine they run here too
ISAS = ["neon", "portable"] if platform.machine().lower() in ("aarch64", "arm64") else ["avx512", "avx2", "portable"]


@pytest.fixture(scope="module")
def extension():
    if cpu.load_extension() is None:
        pytest.skip(f"the C++ CPU kernels did not build here: {cpu.build_error()}")
    return cpu


@pytest.fixture(params=ISAS)
def isa(request, extension):
    if request.param not in extension.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    extension.set_isa(request.param)
    yield request.param
    extension.set_isa(None)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def signs(*shape: int) -> torch.Tensor:
    """Random floats with exact zeros, -0.0 and tiny values, where the sign convention matters."""
    x = torch.randn(*shape)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf")])
    mask = torch.rand(*shape) < 0.1
    return torch.where(mask, special[torch.randint(0, 6, shape)], x)


def epilogue_args(draw_or_flags, n: int, out_shape: tuple[int, ...]):
    has_scale, has_bias, has_res, out_dtype = draw_or_flags
    scale = torch.rand(n) + 0.5 if has_scale else None
    bias = torch.randn(n) if has_bias else None
    residual = torch.randn(out_shape) if has_res else None
    return scale, bias, residual, out_dtype


EPILOGUES = st.tuples(st.booleans(), st.booleans(), st.booleans(),
                      st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64]))


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max abs difference {(got.double() - want.double()).abs().max()}"


# ------------------------------------------------------------------------------------------ sign_pack
@pytest.mark.parametrize("k", RAGGED_K)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sign_pack_rows(isa, k, dtype):
    x = signs(3, 5, k).to(dtype)
    assert_same(ops.sign_pack(x), ref.sign_pack(x))


@pytest.mark.parametrize("c", [1, 31, 32, 33, 70])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sign_pack_nchw(isa, threads, c, channels_last):
    x = signs(2, c, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same(ops.sign_pack_nchw(x), ref.sign_pack(x.permute(0, 2, 3, 1)))


# ---------------------------------------------------------------------------------------- packed_linear
@HYP
@given(m=st.integers(1, 40), n=st.integers(1, 80),
       k=st.one_of(st.sampled_from(RAGGED_K), st.integers(1, 1200)), epi=EPILOGUES, lead=st.booleans())
def test_packed_linear_matches_reference(isa, m, n, k, epi, lead):
    x_bits, w_bits = ref.sign_pack(signs(m, k)), ref.sign_pack(signs(n, k))
    if lead:  # leading dims [2, m/2...] are flattened like the reference's matmul
        x_bits = torch.cat([x_bits, x_bits.flip(0)]).reshape(2, m, -1)
    scale, bias, residual, out_dtype = epilogue_args(epi, n, (*x_bits.shape[:-1], n))
    got = ops.packed_linear(x_bits, w_bits, k, scale, bias, residual, out_dtype)
    assert_same(got, ref.packed_linear(x_bits, w_bits, k, scale, bias, residual, out_dtype))


def test_packed_linear_threads(isa, threads):
    """Many output tiles (rows and channels past the block sizes) split over the threads."""
    k = 577
    x_bits, w_bits = ref.sign_pack(signs(101, k)), ref.sign_pack(signs(150, k))
    scale, bias, residual = torch.rand(150), torch.randn(150), torch.randn(101, 150)
    assert_same(ops.packed_linear(x_bits, w_bits, k), ref.packed_linear(x_bits, w_bits, k))
    assert_same(ops.packed_linear(x_bits, w_bits, k, scale, bias, residual, torch.bfloat16),
                ref.packed_linear(x_bits, w_bits, k, scale, bias, residual, torch.bfloat16))


# ---------------------------------------------------------------------------------------- packed_conv2d
@HYP
@given(batch=st.integers(1, 2), c=st.sampled_from([1, 3, 31, 32, 33, 64, 65, 100]), cout=st.integers(1, 40),
       h=st.integers(1, 11), w=st.integers(1, 11),
       kernel=st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 2), (5, 5)]),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1, 2]), dilation=st.sampled_from([1, 2]),
       pad_value=st.sampled_from([0, 1]), epi=EPILOGUES)
def test_packed_conv2d_matches_reference(isa, batch, c, cout, h, w, kernel, stride, padding, dilation,
                                         pad_value, epi):
    kh, kw = kernel
    ho = ref.conv_output_size(h, kh, stride, padding, dilation)
    wo = ref.conv_output_size(w, kw, stride, padding, dilation)
    assume(ho >= 1 and wo >= 1)
    x_bits, w_bits = ref.sign_pack(signs(batch, h, w, c)), ref.sign_pack(signs(cout, kh, kw, c))
    scale, bias, residual, out_dtype = epilogue_args(epi, cout, (batch, ho, wo, cout))
    args = ((stride, stride), (padding, padding), (dilation, dilation), pad_value, scale, bias, residual,
            out_dtype)
    assert_same(ops.packed_conv2d(x_bits, w_bits, c, *args), ref.packed_conv2d(x_bits, w_bits, c, *args))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.sampled_from([3, 32, 33, 64]), cout=st.sampled_from([1, 31, 32, 33, 64, 65, 130]),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]), pad_value=st.sampled_from([0, 1]),
       scale=st.booleans(), bias=st.booleans(), residual=st.booleans())
def test_packed_conv2d_sign_matches_reference(isa, c, cout, stride, padding, pad_value, scale, bias,
                                              residual):
    """The fused next-layer sign-and-pack equals packing the float32 result (bits past Cout stay 0)."""
    x_bits, w_bits = ref.sign_pack(signs(2, 7, 6, c)), ref.sign_pack(signs(cout, 3, 3, c))
    ho, wo = ref.conv_output_size(7, 3, stride, padding, 1), ref.conv_output_size(6, 3, stride, padding, 1)
    epi = (torch.rand(cout) - 0.3 if scale else None, torch.randn(cout) if bias else None,
           torch.randn(2, ho, wo, cout) if residual else None)
    geometry = ((stride, stride), (padding, padding), (1, 1), pad_value)
    want = ref.sign_pack(ref.packed_conv2d(x_bits, w_bits, c, *geometry, *epi, torch.float32))
    assert_same(ops.packed_conv2d_sign(x_bits, w_bits, c, *geometry, *epi), want)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.sampled_from([3, 33, 64]), cout=st.sampled_from([1, 31, 32, 33, 64, 65, 130]),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad_value=st.sampled_from([0, 1]),
       residual=st.booleans(), bounds=st.sampled_from([(-1.0, 1.0), (-0.3, 0.7), (0.0, 6.0), (0.25, 0.25)]),
       out_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_packed_conv2d_act_matches_reference(isa, c, cout, kernel, stride, pad_value, residual, bounds,
                                             out_dtype):
    """hardtanh fused into the epilogue (clamped in the output dtype, as torch clamps that tensor) and the
    activation's sign bits: both equal the unfused reference, and the bits equal sign_pack(y)."""
    x_bits, w_bits = ref.sign_pack(signs(2, 7, 6, c)), ref.sign_pack(signs(cout, kernel, kernel, c))
    pad = kernel // 2
    ho, wo = ref.conv_output_size(7, kernel, stride, pad, 1), ref.conv_output_size(6, kernel, stride, pad, 1)
    epi = (torch.rand(cout) * 0.2 - 0.05, torch.randn(cout), torch.randn(2, ho, wo, cout) if residual else None)
    args = (x_bits, w_bits, c, (stride, stride), (pad, pad), (1, 1), pad_value, *epi, *bounds, out_dtype)
    y, y_bits = ops.packed_conv2d_act(*args)
    want_y, want_bits = ref.packed_conv2d_act(*args)
    assert_same(y, want_y)
    assert_same(y_bits, want_bits)
    assert_same(y_bits, ref.sign_pack(y))
    unfused = ref.packed_conv2d(*args[:10], out_dtype or torch.float32)
    assert_same(y, torch.nn.functional.hardtanh(unfused, *bounds))


# ---------------------------------------------------------------------------------------- max_pool2d_act
@HYP
@given(c=st.sampled_from([1, 31, 32, 33, 64, 70]), h=st.integers(1, 13), w=st.integers(1, 13),
       kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), pad=st.tuples(st.booleans(), st.booleans()),
       ceil_mode=st.booleans(), bounds=st.sampled_from([(-1.0, 1.0), (-0.3, 0.7), (0.0, 6.0)]),
       layout=st.sampled_from(["channels_last", "nchw", "bfloat16", "float64"]))
def test_max_pool2d_act_matches_torch(isa, c, h, w, kernel, stride, dilation, pad, ceil_mode, bounds, layout):
    """The fused pool (channels-last float32: the core's one pass; other layouts and dtypes: torch's
    max_pool2d and clamp) against torch's max_pool2d + hardtanh + the reference sign-and-pack, NaN included."""
    padding = tuple(k // 2 if p else 0 for k, p in zip(kernel, pad, strict=True))
    assume(min(ops.pool_output_size(n, k, s, p, d, ceil_mode) for n, k, s, p, d in
               zip((h, w), kernel, stride, padding, dilation, strict=True)) >= 1)
    x = torch.where(torch.rand(2, c, h, w) < 0.02, float("nan"), signs(2, c, h, w))
    x = {"channels_last": x.contiguous(memory_format=torch.channels_last), "nchw": x,
         "bfloat16": x.to(torch.bfloat16), "float64": x.double()}[layout]
    y, y_bits = ops.max_pool2d_act(x, kernel, stride, padding, dilation, ceil_mode, *bounds)
    want = torch.nn.functional.hardtanh(
        torch.nn.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode), *bounds)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    assert y.stride() == want.stride()  # torch's memory format for that input
    assert_same(y_bits, ref.sign_pack(want.permute(0, 2, 3, 1)))


def test_max_pool2d_act_resnet_stem_threads(isa, threads):
    x = signs(2, 64, 112, 112).contiguous(memory_format=torch.channels_last)
    y, y_bits = ops.max_pool2d_act(x, 3, 2, 1)
    want = torch.nn.functional.hardtanh(torch.nn.functional.max_pool2d(x, 3, 2, 1))
    assert_same(y, want)
    assert_same(y_bits, ref.sign_pack(want.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("pad_value", [0, 1])
@pytest.mark.parametrize(("stride", "padding", "dilation"),
                         [((1, 2), (2, 1), (1, 1)), ((2, 1), (1, 2), (2, 1))])
def test_packed_conv2d_asymmetric_geometry(isa, pad_value, stride, padding, dilation):
    x_bits, w_bits = ref.sign_pack(signs(2, 9, 10, 45)), ref.sign_pack(signs(7, 3, 3, 45))
    args = (stride, padding, dilation, pad_value)
    assert_same(ops.packed_conv2d(x_bits, w_bits, 45, *args), ref.packed_conv2d(x_bits, w_bits, 45, *args))


@pytest.mark.parametrize("pad_value", [0, 1])
def test_packed_conv2d_resnet_shape_threads(isa, threads, pad_value):
    """A ResNet-18 stage-2 conv (many row tiles, two channel tiles), with the full epilogue."""
    x_bits, w_bits = ref.sign_pack(signs(1, 28, 28, 128)), ref.sign_pack(signs(128, 3, 3, 128))
    scale, bias, residual = torch.rand(128), torch.randn(128), torch.randn(1, 28, 28, 128)
    args = ((1, 1), (1, 1), (1, 1), pad_value, scale, bias, residual, torch.float32)
    assert_same(ops.packed_conv2d(x_bits, w_bits, 128, *args), ref.packed_conv2d(x_bits, w_bits, 128, *args))


# ------------------------------------------------------------------ weights prepared once per tensor (cache)
@pytest.mark.parametrize("pad_value", [0, 1])
def test_weights_changed_in_place_are_prepared_again(isa, pad_value):
    """The kernels keep each weight tensor's prepared layout between calls: an in-place change of the weights
    (load_state_dict, copy_, a bit flipped) must reach the next call, for the conv's panels and its per-tap
    popcounts (the pad_value=0 correction) as for the linear's panels."""
    x_bits, w_bits = ref.sign_pack(signs(1, 9, 9, 70)), ref.sign_pack(signs(40, 3, 3, 70))
    args = ((1, 1), (1, 1), (1, 1), pad_value)
    for _ in range(2):  # the second call takes the cached layout
        assert_same(ops.packed_conv2d(x_bits, w_bits, 70, *args), ref.packed_conv2d(x_bits, w_bits, 70, *args))
    w_bits[3, 0, 0, 0] ^= 1  # one weight's sign, in place: a border tap's popcount changes too
    w_bits[7:] = ref.sign_pack(signs(33, 3, 3, 70))
    assert_same(ops.packed_conv2d(x_bits, w_bits, 70, *args), ref.packed_conv2d(x_bits, w_bits, 70, *args))
    a_bits, b_bits = ref.sign_pack(signs(5, 300)), ref.sign_pack(signs(65, 300))
    assert_same(ops.packed_linear(a_bits, b_bits, 300), ref.packed_linear(a_bits, b_bits, 300))
    b_bits.copy_(ref.sign_pack(signs(65, 300)))
    assert_same(ops.packed_linear(a_bits, b_bits, 300), ref.packed_linear(a_bits, b_bits, 300))


def test_prepared_weights_follow_an_isa_change(extension):
    """The prepared layout is the ISA's own (AVX-512 and AVX2 panels differ): switching ISA between two calls
    on the same weights must not read the other ISA's layout."""
    x_bits, w_bits = ref.sign_pack(signs(1, 7, 7, 64)), ref.sign_pack(signs(48, 3, 3, 64))
    want = ref.packed_conv2d(x_bits, w_bits, 64, (1, 1), (1, 1), (1, 1), 0)
    try:
        for name in [i for i in ISAS if i in extension.available_isas()] * 2:
            extension.set_isa(name)
            assert_same(ops.packed_conv2d(x_bits, w_bits, 64, (1, 1), (1, 1), (1, 1), 0), want)
    finally:
        extension.set_isa(None)
    with torch.inference_mode():  # inference tensors have no version counter: prepared per call, still exact
        w_inf = w_bits.clone()
        assert_same(ops.packed_conv2d(x_bits, w_inf, 64, (1, 1), (1, 1), (1, 1), 0), want)


# ------------------------------------------------------------------------------------ tracing and dispatch
def test_opcheck_fake_kernels(extension):
    x_bits, w_bits = ref.sign_pack(signs(6, 70)), ref.sign_pack(signs(9, 70))
    cx, cw = ref.sign_pack(signs(1, 6, 6, 40)), ref.sign_pack(signs(5, 3, 3, 40))
    cases = [
        (torch.ops.ovsw.sign_pack.default, (signs(4, 70),)),
        (torch.ops.ovsw.sign_pack_nchw.default, (signs(2, 40, 3, 3),)),
        (torch.ops.ovsw.packed_linear.default, (x_bits, w_bits, 70)),
        (torch.ops.ovsw.packed_linear.default, (x_bits, w_bits, 70, torch.rand(9), torch.randn(9), None,
                                                torch.bfloat16)),
        (torch.ops.ovsw.packed_conv2d.default, (cx, cw, 40, [2, 1], [1, 1], [1, 1], 0, torch.rand(5), None,
                                                torch.randn(1, 3, 6, 5), torch.float32)),
        (torch.ops.ovsw.packed_conv2d_sign.default, (cx, cw, 40, [1, 1], [1, 1], [1, 1], 1, torch.rand(5),
                                                     torch.randn(5), None)),
        (torch.ops.ovsw.packed_conv2d_act.default, (cx, cw, 40, [1, 1], [1, 1], [1, 1], 0, torch.rand(5),
                                                    torch.randn(5), torch.randn(1, 6, 6, 5), -1.0, 1.0,
                                                    torch.bfloat16)),
        (torch.ops.ovsw.max_pool2d_act.default, (signs(2, 40, 7, 6), [3, 2], [2, 2], [1, 1], [1, 1], True,
                                                 -0.5, 1.0)),
        (torch.ops.ovsw.max_pool2d_act.default, (signs(1, 33, 9, 9).contiguous(memory_format=torch.channels_last),
                                                 [3, 3], [2, 2], [1, 1], [1, 1], False, -1.0, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_export_traces_and_runs_the_ops(extension):
    w_bits, scale, fc_bits = ref.sign_pack(signs(8, 3, 3, 40)), torch.rand(8), ref.sign_pack(signs(3, 288))

    class Net(torch.nn.Module):
        def forward(self, x):
            bits = torch.ops.ovsw.sign_pack_nchw(x)
            y = torch.ops.ovsw.packed_conv2d(bits, w_bits, 40, [1, 1], [1, 1], [1, 1], 0, scale, None, None,
                                             torch.float32)
            return torch.ops.ovsw.packed_linear(ops.sign_pack(y.flatten(1)), fc_bits, 288)

    x = signs(2, 40, 6, 6)
    program = torch.export.export(Net(), (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    expected = {"ovsw.sign_pack_nchw.default", "ovsw.packed_conv2d.default", "ovsw.packed_linear.default"}
    assert expected <= targets
    assert_same(program.module()(x), Net()(x))


def test_reference_fallback_without_compiler(tmp_path):
    """A failed build (here: no working C++ compiler) leaves the ops on the reference, warned once."""
    code = """if True:
        import warnings, torch
        from lightning_ovsw.kernels import cpu, ops, reference as ref
        x, w = ref.sign_pack(torch.randn(5, 70)), ref.sign_pack(torch.randn(3, 70))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [ops.packed_linear(x, w, 70), ops.packed_linear(x, w, 70, torch.ones(3))]
        assert cpu.load_extension() is None and cpu.build_error()
        assert [str(c.message) for c in caught if "slow PyTorch reference" in str(c.message)].__len__() == 1
        assert torch.equal(got[0], ref.packed_linear(x, w, 70))
        assert torch.equal(got[1], ref.packed_linear(x, w, 70, torch.ones(3)))
        print("ok")
    """
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/bin/false")
    env.pop("LIGHTNING_OVSW_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_isa_environment_variable(extension):
    code = "from lightning_ovsw.kernels import cpu; print(cpu.get_isa())"
    env = dict(os.environ, LIGHTNING_OVSW_CPU_ISA="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "portable"
    with pytest.raises(ValueError, match="unknown ISA"):
        extension.set_isa("sse9")


# ------------------------------------------------------------------------------------------------- errors
def _bad_calls():
    """(op, args, kwargs, exception type, message fragment): one wrong argument each."""
    x_bits, w_bits = ref.sign_pack(signs(4, 40)), ref.sign_pack(signs(3, 40))
    cx, cw = ref.sign_pack(signs(1, 5, 5, 40)), ref.sign_pack(signs(2, 3, 3, 40))
    pool_x = signs(1, 8, 5, 5)
    return [
        ("packed_linear", (x_bits.float(), w_bits, 40), {}, TypeError, "int32"),
        ("packed_linear", (x_bits, w_bits, 70), {}, ValueError, "words per row"),
        ("packed_linear", (x_bits, w_bits, 0), {}, ValueError, "k must be a positive int"),
        ("packed_linear", (x_bits, w_bits, 40, torch.ones(4)), {}, ValueError, "one value per output channel"),
        ("packed_linear", (x_bits, w_bits, 40, None, torch.ones(3, dtype=torch.int64)), {}, TypeError,
         "bias must be a floating point tensor"),
        ("packed_linear", (x_bits, w_bits, 40, None, None, torch.ones(3, 4)), {}, ValueError,
         "residual must have the output's shape"),
        ("packed_linear", (x_bits, w_bits, 40, torch.ones(3, device="meta")), {}, ValueError, "one device"),
        ("packed_linear", (x_bits, w_bits, 40, None, None, None, torch.int8), {}, ValueError, "out_dtype"),
        ("sign_pack", (torch.ones(3, 4, dtype=torch.int64),), {}, TypeError, "floating point"),
        ("sign_pack", (torch.ones(3, 0),), {}, ValueError, "non-empty last dim"),
        ("sign_pack_nchw", (torch.ones(3, 4),), {}, ValueError, "NCHW"),
        ("packed_conv2d", (cx, cw, 70), {}, ValueError, "words per pixel"),
        ("packed_conv2d", (cx, cw, 40), {"pad_value": 2}, ValueError, "pad_value"),
        ("packed_conv2d", (cx, cw, 40), {"stride": (0, 1)}, ValueError, "stride"),
        ("packed_conv2d", (cx, cw, 40), {"padding": [-1, 0]}, ValueError, "padding"),
        ("packed_conv2d", (cx, cw, 40), {"dilation": (1, 0)}, ValueError, "dilation"),
        ("packed_conv2d", (cx, ref.sign_pack(signs(2, 7, 7, 40)), 40), {}, ValueError, "does not fit"),
        ("packed_conv2d", (cx[0], cw, 40), {}, ValueError, "4 dims"),
        ("packed_conv2d", (cx, cw.long(), 40), {}, TypeError, "w_bits must be an int32"),
        ("packed_conv2d", (cx, cw, 40), {"bias": torch.ones(3)}, ValueError, "one value per output channel"),
        ("packed_conv2d_sign", (cx, cw, 40), {"residual": torch.ones(1, 3, 3, 3)}, ValueError,
         "residual must have the output's shape"),
        ("packed_conv2d_act", (cx, cw, 40), {"min_val": 1.0, "max_val": -1.0}, ValueError,
         "min_val must be <= max_val"),
        ("packed_conv2d_act", (cx, cw, 40), {"out_dtype": torch.int32}, ValueError, "out_dtype"),
        ("max_pool2d_act", (pool_x.long(), 3, 2), {}, TypeError, "floating point"),
        ("max_pool2d_act", (pool_x[0], 3, 2), {}, ValueError, "NCHW"),
        ("max_pool2d_act", (pool_x, (3, 0), 1), {}, ValueError, "kernel_size"),
        ("max_pool2d_act", (pool_x, 3, 0), {}, ValueError, "stride"),
        ("max_pool2d_act", (pool_x, 3, 2, 2), {}, ValueError, "at most half the kernel size"),
        ("max_pool2d_act", (pool_x, 3, 1, 0, (1, -1)), {}, ValueError, "dilation"),
        ("max_pool2d_act", (pool_x, 7, 1), {}, ValueError, "does not fit"),
        ("max_pool2d_act", (pool_x, 3, 2), {"min_val": 2.0}, ValueError, "min_val must be <= max_val"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_clear_errors(case):
    """Each wrong argument raises the documented error from the op; from the C++ kernels (the ops' CPU
    dispatch, which checks its arguments itself) with exactly the message of the one Python validation
    (``ops.validate``, what the reference, Triton and fake kernels run)."""
    name, args, kwargs, kind, fragment = _bad_calls()[case]
    with pytest.raises(kind, match=fragment) as python:
        ops.validate(name, *args, **kwargs)
    with pytest.raises(kind, match=fragment) as dispatched:
        getattr(ops, name)(*args, **kwargs)
    if cpu.load_extension() is not None:
        assert str(dispatched.value) == str(python.value)


def test_cuda_dispatch_glue_under_the_triton_interpreter():
    """The functions the CUDA kernels call (argument order, float64 output via float32, fused sign-and-pack)
    against the reference, run by the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1
    without CUDA). On a GPU the same functions run compiled; ``test_triton_cuda.py`` covers the kernels."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest when there is no CUDA)")
    tri = pytest.importorskip("lightning_ovsw.kernels.triton.launch")
    x_bits, w_bits = ref.sign_pack(signs(3, 40)), ref.sign_pack(signs(5, 40))
    cx, cw = ref.sign_pack(signs(1, 5, 4, 33)), ref.sign_pack(signs(6, 3, 3, 33))
    scale, bias = torch.rand(6) - 0.3, torch.randn(6)
    geometry = ([2, 1], [1, 1], [1, 1], 0)
    cases = {
        "sign_pack": (signs(3, 40),),
        "sign_pack_nchw": (signs(1, 33, 4, 5),),
        "packed_linear": (x_bits, w_bits, 40, torch.rand(5), None, None, torch.float64),
        "packed_conv2d": (cx, cw, 33, *geometry, scale, bias, None, torch.bfloat16),
        "packed_conv2d_sign": (cx, cw, 33, *geometry, scale, bias, torch.randn(1, 3, 4, 6)),
    }
    for name, args in cases.items():
        reference_fn, cuda_fn, _ = ops._IMPLS[name]
        got, want = cuda_fn(tri, *args), reference_fn(*args)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.is_floating_point():  # Triton rounds the epilogue its own way (FMA, bf16 casts): 1 ulp
            torch.testing.assert_close(got, want)
        else:
            assert torch.equal(got, want), name
    act_args = (cx, cw, 33, *geometry, scale, bias, torch.randn(1, 3, 4, 6), -0.5, 0.5, torch.float16)
    (y, y_bits), (want_y, _) = ops._conv_act_triton(tri, *act_args), ops._conv_act_reference(*act_args)
    torch.testing.assert_close(y, want_y)
    assert torch.equal(y_bits, ref.sign_pack(y))
    pool_args = (signs(1, 33, 7, 6), [3, 3], [2, 2], [1, 1], [1, 1], True, -0.5, 0.5)
    (y, y_bits), (want_y, want_bits) = ops._max_pool2d_act_triton(tri, *pool_args), ops._max_pool2d_act_reference(
        *pool_args)
    assert_same(y, want_y)
    assert_same(y_bits, want_bits)
