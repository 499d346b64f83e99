"""ferry's compiled CPU kernels: the native build and the portable (non-AVX-512) one."""

from __future__ import annotations

from types import ModuleType

import pytest

from ferry.kernels.build import load_cpu_kernels


@pytest.fixture(scope="session")
def ops() -> ModuleType:
    return load_cpu_kernels()


@pytest.fixture(scope="session")
def portable_ops() -> ModuleType:
    # the same sources without AVX-512: the fallback loops a machine without it would run
    return load_cpu_kernels(["-mno-avx512f"])
