"""C++ CPU popcount kernels behind the ``ovsw`` ops, built on first use with ``torch.utils.cpp_extension``.

``ovsw_cpu.cpp`` holds AVX-512 VPOPCNTDQ, AVX2 and portable microkernels (NEON on aarch64) in one binary,
chosen at run time from the CPU's features, or forced with ``LIGHTNING_OVSW_CPU_ISA`` =
``avx512`` | ``avx2`` | ``portable`` (or ``set_isa``). The build is cached outside the source tree, in
``$TORCH_EXTENSIONS_DIR/lightning_ovsw`` or ``~/.cache/lightning_ovsw/torch_extensions``. If it fails
(no compiler, unsupported platform) ``load_extension`` returns None and ``build_error`` says why.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available_isas", "build_error", "get_isa", "load_extension", "set_isa"]

_SOURCE = Path(__file__).with_name("ovsw_cpu.cpp")
_ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "neon": 3}
_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "ext": None, "error": None}


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    base = Path(root) / "lightning_ovsw" if root else cache / "lightning_ovsw" / "torch_extensions"
    path = base / f"torch{torch.__version__.split('+')[0]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Kernels:
    """Thin adapter from the ``ovsw`` op arguments to the ``ovsw_cpu`` C++ ops (float32/int32 buffers)."""

    def __init__(self) -> None:
        self._ops = torch.ops.ovsw_cpu

    def sign_pack(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:  # float32 rounding could turn a tiny negative into -0.0 (= +1)
            from ..reference import sign_pack
            return sign_pack(x)
        k = x.shape[-1]
        rows = x.reshape(-1, k).to(torch.float32).contiguous()
        return self._ops.sign_pack(rows).reshape(*x.shape[:-1], -1)

    def sign_pack_nchw(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:
            from ..reference import sign_pack
            return sign_pack(x.permute(0, 2, 3, 1))
        if x.is_contiguous(memory_format=torch.channels_last):
            return self.sign_pack(x.permute(0, 2, 3, 1))
        return self._ops.sign_pack_nchw(x.to(torch.float32).contiguous())

    @staticmethod
    def _epilogue(scale, bias, residual, out_dtype):
        raw = scale is None and bias is None and residual is None and out_dtype is None
        native = out_dtype if out_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

        def f32(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1).to(torch.float32).contiguous()

        if residual is not None and residual.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            residual = residual.to(torch.float32)
        residual = None if residual is None else residual.contiguous()
        return raw, native, f32(scale), f32(bias), residual

    def packed_linear(self, x_bits, w_bits, k, scale, bias, residual, out_dtype):
        raw, native, scale, bias, residual = self._epilogue(scale, bias, residual, out_dtype)
        lead = x_bits.shape[:-1]
        a = x_bits.reshape(-1, x_bits.shape[-1]).contiguous()
        res = None if residual is None else residual.reshape(a.shape[0], -1)
        out = self._ops.packed_linear(a, w_bits.contiguous(), k, scale, bias, res, raw, native)
        out = out.reshape(*lead, w_bits.shape[0])
        return out if raw or out_dtype in (None, native) else out.to(out_dtype)

    def packed_conv2d(self, x_bits, w_bits, in_channels, stride, padding, dilation, pad_value, scale, bias,
                      residual, out_dtype):
        raw, native, scale, bias, residual = self._epilogue(scale, bias, residual, out_dtype)
        out = self._ops.packed_conv2d(x_bits.contiguous(), w_bits.contiguous(), in_channels, list(stride),
                                      list(padding), list(dilation), pad_value, scale, bias, residual, raw,
                                      native)
        return out if raw or out_dtype in (None, native) else out.to(out_dtype)


def load_extension() -> _Kernels | None:
    """Build (first call; cached on disk) and load the C++ kernels; None if that is impossible."""
    if _STATE["tried"]:
        return _STATE["ext"]
    with _LOCK:
        if not _STATE["tried"]:
            try:
                from torch.utils import cpp_extension

                cpp_extension.load(
                    name="lightning_ovsw_cpu",
                    sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
                    build_directory=str(_build_dir()),
                    is_python_module=False,
                    verbose=False,
                )
                _STATE["ext"] = _Kernels()
            except Exception as err:  # noqa: BLE001  (no compiler, failed build: fall back, say why)
                last = str(err).strip().splitlines()[-1:] or [""]
                _STATE["error"] = f"{type(err).__name__}: {last[0]}"
            _STATE["tried"] = True
            env = os.environ.get("LIGHTNING_OVSW_CPU_ISA")
            if env and _STATE["ext"] is not None:
                _set_isa(env)
    return _STATE["ext"]


def build_error() -> str | None:
    """Why the extension is not available (None if it is, or was not tried yet)."""
    return _STATE["error"]


def available_isas() -> list[str]:
    """The microkernel families this CPU can run, fastest first (empty without the extension)."""
    if load_extension() is None:
        return []
    mask = torch.ops.ovsw_cpu.supported_isas()
    return [name for name, code in sorted(_ISAS.items(), key=lambda kv: -kv[1]) if mask >> code & 1]


def get_isa() -> str:
    """The microkernel family in use."""
    if load_extension() is None:
        raise RuntimeError(f"the C++ CPU kernels are not available: {build_error()}")
    code = torch.ops.ovsw_cpu.get_isa()
    return next(name for name, c in _ISAS.items() if c == code)


def set_isa(name: str | None) -> None:
    """Force one microkernel family (``avx512``, ``avx2``, ``portable``, ``neon``); None picks the best."""
    if load_extension() is None:
        raise RuntimeError(f"the C++ CPU kernels are not available: {build_error()}")
    _set_isa(name)


def _set_isa(name: str | None) -> None:
    if name is None:
        torch.ops.ovsw_cpu.set_isa(-1)
        return
    if name not in _ISAS:
        raise ValueError(f"unknown ISA {name!r}; choose one of {sorted(_ISAS)} (LIGHTNING_OVSW_CPU_ISA)")
    mask = torch.ops.ovsw_cpu.supported_isas()
    if not mask >> _ISAS[name] & 1:
        raise ValueError(f"this CPU / build cannot run the {name!r} kernels (LIGHTNING_OVSW_CPU_ISA); "
                         f"available: {[n for n, c in _ISAS.items() if mask >> c & 1]}")
    torch.ops.ovsw_cpu.set_isa(_ISAS[name])
