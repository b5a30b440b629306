"""The torch-free CPU kernel core (``kernels/cpu/core``) through its own C++ test driver, built here with the
system C++ compiler: every ISA path compiled in and supported by this CPU against the driver's scalar
reference, bit for bit. ``.ci/cpu_core.sh`` runs the same driver with the extension's flags and, cross-compiled,
the NEON path under qemu-aarch64; this test keeps the plain test suite on it (at -O2, fewer cases: quicker).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "kernels" / "cpu" / "core"
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-pthread"]


def compiler() -> list[str] | None:
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    return None


def compiles(cxx: list[str], flags: list[str], tmp: Path) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("int main() { return 0; }\n")
    return subprocess.run([*cxx, *flags, str(src), "-o", str(tmp / "probe")], capture_output=True).returncode == 0


def build(cxx: list[str], flags: list[str], out: Path) -> None:
    """One compiler process per source (in parallel), then the link."""
    sources = sorted(CORE.glob("*.cpp"))
    objects = [out.with_name(f"{src.stem}.o") for src in sources]
    procs = [subprocess.Popen([*cxx, *flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for src, obj in zip(sources, objects, strict=True)]
    for src, proc in zip(sources, procs, strict=True):
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compiling {src.name} failed:\n{log[-3000:]}"
    link = subprocess.run([*cxx, *flags, *map(str, objects), "-o", str(out)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-3000:]


def test_core_driver_matches_its_reference(tmp_path):
    cxx = compiler()
    if cxx is None or not compiles(cxx, FLAGS, tmp_path):
        pytest.skip(f"no working C++17 compiler ({cxx or 'none of CXX, c++, g++, clang++'})")
    flags = list(FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64") and not compiles(cxx, ["-mavx512vpopcntdq"], tmp_path):
        flags.append("-DOVSW_CORE_NO_AVX512")  # an old compiler: the core builds without its AVX-512 kernels
    driver = tmp_path / "test_core"
    build(cxx, flags, driver)
    run = subprocess.run([str(driver), "--cases", "200"], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "portable: 200 cases, 0 mismatches" in lines
    ran = [line.split(":")[0] for line in lines if line.endswith(" 0 mismatches")]
    assert len(ran) >= 1 and all(name in ("portable", "avx2", "avx512", "neon") for name in ran)
