"""Compile and load ferry's CPU kernels with PyTorch's C++ extension builder.

The build is cached by PyTorch (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
so only the first load on a machine pays the ~25 s compile. ``-march=native`` makes the code
specific to this CPU, so the extension's name carries a hash of the CPU's model and flags: a home
directory shared with a different CPU gets its own build instead of an illegal instruction.

    python -m ferry.kernels.build     # compile now (``make install`` does), print what was built
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).with_name(name)
           for name in ("quant_linear.cpp", "paged_attention.cpp", "fused_ops.cpp", "bindings.cpp")]
# NOTE: -ffp-contract=off keeps d * q + m two float32 operations, as gguf-py computes it, so
# dequantized weights equal the reference bit for bit.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


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


def extension_name(extra_cflags: list[str]) -> str:
    digest = hashlib.sha256((cpu_signature() + " ".join(extra_cflags)).encode()).hexdigest()[:12]
    return f"ferry_cpu_kernels_{digest}"


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


def load_cpu_kernels(extra_cflags: list[str] | None = None) -> ModuleType:
    """The compiled module (``quant_linear``, ``quant_rows``, ``paged_decode_attention``);
    raises ``KernelUnavailableError``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailableError(f"ferry's CPU kernels are built for x86-64, not "
                                     f"{platform.machine()}")
    if shutil.which("c++") is None:
        raise KernelUnavailableError("building ferry's CPU kernels needs a C++ compiler (c++)")
    _find_ninja()
    from torch.utils.cpp_extension import load

    flags = CFLAGS + list(extra_cflags or [])
    try:
        return load(name=extension_name(flags), sources=[str(p) for p in SOURCES], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:
        # NOTE: a failed compiler run surfaces as RuntimeError, a bad .so as ImportError.
        raise KernelUnavailableError(f"building ferry's CPU kernels failed: {e}") from e


def main() -> None:
    try:
        ops = load_cpu_kernels()
    except KernelUnavailableError as e:
        print(f"ferry: CPU kernels not available ({e}); GGUF weights will be dequantized to "
              "float32 at load and attention will run on PyTorch ops")
        return
    if not ops.vectorized():
        print("ferry: CPU kernels built, but this CPU has no AVX-512: ferry will use dequantized "
              "float32 weights and PyTorch ops")
        return
    print(f"ferry: CPU kernels ready ({Path(ops.__file__).name})")


if __name__ == "__main__":
    main()
