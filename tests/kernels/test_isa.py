"""Which instruction set a kernel build has, how one is chosen, and the AVX2 build in the engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from engine.test_parity import check_parity
from hf_reference import load_hf_gguf

from ferry import LLM
from ferry.kernels import build
from ferry.kernels.build import KernelUnavailableError, cpu_flags, load_cpu_kernels

# AVX-512 in a disassembly: zmm registers, opmask registers, or the EVEX-only ymm16..31/xmm16..31
AVX512_OPERAND = re.compile(r"%zmm|%k[1-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")


def disassembly(ops: ModuleType) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", ops.__file__], check=True,
                          capture_output=True, text=True).stdout


def test_each_build_reports_its_instruction_set(ops: ModuleType, avx2_ops: ModuleType,
                                                portable_ops: ModuleType) -> None:
    assert avx2_ops.isa() == "avx2" and avx2_ops.vectorized()
    assert portable_ops.isa() == "portable" and not portable_ops.vectorized()
    assert ops.isa() == ("avx512" if "avx512f" in cpu_flags() else "avx2") and ops.vectorized()
    names = [Path(m.__file__).name for m in (ops, avx2_ops, portable_ops)]
    assert names[1].startswith("ferry_cpu_kernels_avx2_") and len(set(names)) == 3


def test_the_avx2_build_has_no_avx512_instruction(avx2_ops: ModuleType,
                                                  portable_ops: ModuleType) -> None:
    code = disassembly(avx2_ops)
    assert not AVX512_OPERAND.search(code), AVX512_OPERAND.search(code)
    assert re.search(r"vfmadd\w*ps\s+%ymm", code)  # and it does run the 8-wide FMA loops
    portable = disassembly(portable_ops)
    assert not AVX512_OPERAND.search(portable) and "vfmadd" not in portable


def build_name(ops: ModuleType) -> str:
    """The extension's name without PyTorch's "_v1" suffix (added when sources change)."""
    return re.sub(r"_v\d+$", "", ops.__name__)


def test_ferry_kernel_isa_selects_the_build(monkeypatch: pytest.MonkeyPatch, ops: ModuleType,
                                            avx2_ops: ModuleType,
                                            portable_ops: ModuleType) -> None:
    # the same names as the session's builds: loading is a cache hit, no compile
    for value, want in [("avx2", avx2_ops), ("portable", portable_ops), ("auto", ops),
                        (" AVX2 ", avx2_ops)]:
        monkeypatch.setenv("FERRY_KERNEL_ISA", value)
        assert build_name(load_cpu_kernels()) == build_name(want), value
    monkeypatch.setenv("FERRY_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="FERRY_KERNEL_ISA='sse9': unknown instruction set"):
        load_cpu_kernels()
    monkeypatch.delenv("FERRY_KERNEL_ISA")
    assert build_name(load_cpu_kernels()) == build_name(ops)


def test_asking_for_more_than_the_cpu_has_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # an AVX2-only CPU (flags as an AMD EPYC 7003 reports them): no build is attempted, so no
    # AVX-512 code can be loaded to die with SIGILL
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma", "f16c"})
    with pytest.raises(KernelUnavailableError, match="asks for avx512 kernels, but this CPU lacks "
                                                     "avx512f"):
        load_cpu_kernels(isa="avx512")
    monkeypatch.setenv("FERRY_KERNEL_ISA", "avx512")
    with pytest.raises(KernelUnavailableError, match="FERRY_KERNEL_ISA='avx512'"):
        load_cpu_kernels()
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse4_2", "avx"})
    with pytest.raises(KernelUnavailableError, match="lacks avx2, fma"):
        load_cpu_kernels(isa="avx2")


def test_smollm2_on_the_avx2_kernels_matches_transformers(
        monkeypatch: pytest.MonkeyPatch, avx2_ops: ModuleType, smollm2_path: Path) -> None:
    # what an AVX2-only machine runs: the engine picks the kernels up since vectorized() holds
    monkeypatch.setenv("FERRY_KERNEL_ISA", "avx2")
    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20)
    runner = llm.engine.core.runner
    assert runner.kernels is not None and runner.kernels.isa() == "avx2"
    assert runner.num_packed_layers == 30 * 4 + 1
    check_parity(llm, load_hf_gguf(smollm2_path))
