"""Compile and load ferry's CPU kernels with PyTorch's C++ extension builder.

The build is cached by PyTorch (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so only the first load on a machine pays the ~25 s compile. ``-march=native`` makes the code
specific to this CPU, so the extension's name carries a hash of the CPU's model and flags: a home
directory shared with a different CPU gets its own build instead of an illegal instruction.

The kernels come in three instruction sets, chosen at compile time (``isa()`` of the module):
AVX-512, AVX2 + FMA and a portable scalar fallback. ``-march=native`` picks the best this CPU
has; ``isa="avx2"`` or ``isa="portable"`` builds a lesser one on a CPU that has more (tests and
benchmarks), and ``FERRY_KERNEL_ISA=auto|avx512|avx2|portable`` makes the engine's
``load_cpu_kernels()`` do the same.

    python -m ferry.kernels.build [--isa avx2]   # compile now (``make install`` does), print what was built
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).with_name(name)
           for name in ("quant_linear.cpp", "paged_attention.cpp", "fused_ops.cpp", "decode_step.cpp",
                         "bindings.cpp")]
# NOTE: -ffp-contract=off keeps d * q + m two float32 operations, as gguf-py computes it, so
# dequantized weights equal the reference bit for bit.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
ISA_ENV = "FERRY_KERNEL_ISA"
# flags added to CFLAGS per instruction set; "native" (and "avx512", checked against the CPU) is
# whatever -march=native gives. NOTE: -mno-avx512f turns off every AVX-512 subset as well, and
# -mno-avx2 everything built on AVX2 (AVX-VNNI); the code then sees neither __AVX512F__ nor __AVX2__.
ISA_FLAGS: dict[str, list[str]] = {
    "native": [],
    "avx512": [],
    "avx2": ["-mno-avx512f"],
    "portable": ["-mno-avx512f", "-mno-avx2", "-mno-fma"],
}
# /proc/cpuinfo flags each instruction set's kernels execute
ISA_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f",), "avx2": ("avx2", "fma"), "portable": (), "native": (),
}


class KernelUnavailableError(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


def cpu_signature() -> str:
    """The CPU model and feature flags (Linux), or the platform's processor name elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    for line in cpu_signature().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_isa(isa: str | None) -> str:
    """The build to load for ``isa`` (None: ``$FERRY_KERNEL_ISA``, default auto): "native",
    "avx512", "avx2" or "portable"; raises ``KernelUnavailableError`` when the CPU lacks it."""
    source = f"isa={isa!r}" if isa is not None else f"{ISA_ENV}={os.environ.get(ISA_ENV)!r}"
    name = (isa if isa is not None else os.environ.get(ISA_ENV, "auto")).strip().lower() or "auto"
    name = "native" if name == "auto" else name
    if name not in ISA_FLAGS:
        raise ValueError(f"{source}: unknown instruction set, expected one of "
                         f"auto, {', '.join(ISA_FLAGS)}")
    missing = [f for f in ISA_CPU_FLAGS[name] if f not in cpu_flags()]
    if missing:
        raise KernelUnavailableError(f"{source} asks for {name} kernels, but this CPU lacks "
                                     f"{', '.join(missing)}")
    return name


def extension_name(extra_cflags: list[str], label: str = "native") -> str:
    digest = hashlib.sha256((cpu_signature() + " ".join(extra_cflags)).encode()).hexdigest()[:12]
    return f"ferry_cpu_kernels_{label}_{digest}"


def _find_ninja() -> None:
    """PyTorch runs ``ninja`` from PATH; the one pip installs sits beside this interpreter, which
    is not on PATH when the venv is used without being activated (``.venv/bin/python``)."""
    if shutil.which("ninja") is not None:
        return
    beside = Path(sys.executable).parent
    if not (beside / "ninja").exists():
        raise KernelUnavailableError("building ferry's CPU kernels needs ninja "
                                     "(pip install ninja)")
    os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"


def load_cpu_kernels(extra_cflags: list[str] | None = None, isa: str | None = None) -> ModuleType:
    """The compiled module (``quant_linear``, ``quant_rows``, ``paged_decode_attention``, ...,
    ``isa()``) for instruction set ``isa`` ("native"/"auto", "avx512", "avx2", "portable"; None:
    ``$FERRY_KERNEL_ISA``, default auto); raises ``KernelUnavailableError``, and ``ValueError``
    for an unknown ``isa``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailableError(f"ferry's CPU kernels are built for x86-64, not "
                                     f"{platform.machine()}")
    name = resolve_isa(isa)
    if shutil.which("c++") is None:
        raise KernelUnavailableError("building ferry's CPU kernels needs a C++ compiler (c++)")
    _find_ninja()
    from torch.utils.cpp_extension import load

    isa_flags = ISA_FLAGS[name]
    flags = CFLAGS + isa_flags + list(extra_cflags or [])
    label = "native" if not isa_flags else name
    try:
        ops = load(name=extension_name(flags, label), sources=[str(p) for p in SOURCES],
                   extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:
        # NOTE: a failed compiler run surfaces as RuntimeError, a bad .so as ImportError.
        raise KernelUnavailableError(f"building ferry's CPU kernels failed: {e}") from e
    if name != "native" and ops.isa() != name:
        # NOTE: e.g. a compiler too old to know this CPU, whose -march=native lacks AVX-512
        raise KernelUnavailableError(f"asked for {name} kernels, but the compiler built "
                                     f"{ops.isa()} ones")
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description="compile ferry's CPU kernels now and say what was built")
    ap.add_argument("--isa", default=None, choices=["auto", *ISA_FLAGS],
                    help=f"instruction set (default: ${ISA_ENV}, else auto: the best this CPU has)")
    args = ap.parse_args()
    try:
        ops = load_cpu_kernels(isa=args.isa)
    except KernelUnavailableError as e:
        print(f"ferry: CPU kernels not available ({e}); GGUF weights will be dequantized to "
              "float32 at load and attention will run on PyTorch ops")
        return
    print(f"ferry: CPU kernels built for {ops.isa()} ({Path(ops.__file__).name})")
    if not ops.vectorized():
        print("ferry: this build has no AVX2 or AVX-512 kernels: ferry will use dequantized "
              "float32 weights and PyTorch ops")


if __name__ == "__main__":
    main()
