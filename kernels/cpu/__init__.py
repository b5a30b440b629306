"""C++ CPU popcount kernels behind the ``ovsw`` ops, built on first use with ``torch.utils.cpp_extension``.

``ovsw_cpu.cpp`` binds the torch-free kernel core in ``core/`` (``core/ovsw_core.h``, tested on its own by
``core/test_core.cpp``): AVX-512 VPOPCNTDQ, AVX2 and portable microkernels (NEON on aarch64) in one binary,
chosen at run time from the CPU's features, or forced with ``LIGHTNING_OVSW_CPU_ISA`` = ``avx512`` |
``avx2`` | ``portable`` | ``neon`` (or ``set_isa``). The build is cached outside the source tree, in
``$TORCH_EXTENSIONS_DIR/lightning_ovsw`` or ``~/.cache/lightning_ovsw/torch_extensions``. If it fails
(no compiler, unsupported platform) ``load_extension`` returns None and ``build_error`` says why.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["available_isas", "build_error", "get_isa", "load_extension", "set_isa"]

_HERE = Path(__file__).parent
# the binding and the core; core/test_*.cpp is the core's own test driver (.ci/cpu_core.sh), not built here
_SOURCES = [_HERE / "ovsw_cpu.cpp", *sorted(p for p in (_HERE / "core").glob("*.cpp") if not p.name.startswith("test_"))]
_ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "neon": 3}
_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "ext": None, "error": None}
# Called once before the library loads, and after a failed build: ``kernels/ops.py`` drops its Python CPU
# loader kernels so that the C++ registration does not override live ones, and restores them on failure.
BEFORE_LOAD: list[Callable[[], None]] = []
AFTER_FAILED_LOAD: list[Callable[[], None]] = []


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    base = Path(root) / "lightning_ovsw" if root else cache / "lightning_ovsw" / "torch_extensions"
    path = base / f"torch{torch.__version__.split('+')[0]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_extension() -> Path | None:
    """Build (first call; cached on disk) and load the C++ kernels, which register themselves as the ``ovsw``
    ops' CPU kernels (``TORCH_LIBRARY_IMPL``); returns the library's path, or None if that is impossible
    (see ``build_error``)."""
    if _STATE["tried"]:
        return _STATE["ext"]
    from .. import ops  # noqa: F401  (the op schemas and Python CPU kernels come first)

    with _LOCK:
        if not _STATE["tried"]:
            for hook in BEFORE_LOAD:
                hook()
            _STATE["ext"] = _build()
            if _STATE["ext"] is None:
                for hook in AFTER_FAILED_LOAD:
                    hook()
            _STATE["tried"] = True
            env = os.environ.get("LIGHTNING_OVSW_CPU_ISA")
            if env and _STATE["ext"] is not None:
                _set_isa(env)
    return _STATE["ext"]


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning on machines
    without CUDA (these kernels are CPU-only; the line only confuses CPU users)."""
    if "torch.utils.cpp_extension" not in sys.modules and not torch.cuda.is_available():
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)
    from torch.utils import cpp_extension

    return cpp_extension


def _build() -> Path | None:
    """Compile (or reuse the cached build) and load; OpenMP threads if the compiler has them, else serial."""
    cpp_extension = _cpp_extension()
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    errors = []
    for name, extra in (("lightning_ovsw_cpu", ["-fopenmp"]), ("lightning_ovsw_cpu_serial", [])):
        build_dir = _build_dir() / name
        library = build_dir / f"{name}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
        if not library.exists():
            print(f"lightning-ovsw: building the C++ CPU kernels once (about 30 s to 2 min) into {build_dir}; "
                  "later runs reuse that build.", file=sys.stderr, flush=True)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=flags + extra,
                               build_directory=str(build_dir), is_python_module=False, verbose=False)
        except Exception as err:  # noqa: BLE001  (no compiler, failed build: try the next, then say why)
            first = (str(err).strip().splitlines() or [""])[0][:300]
            errors.append(f"{type(err).__name__}: {first}")
            continue
        _STATE["error"] = None
        return library
    _STATE["error"] = "; ".join(errors)
    return None


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
