"""ferry's compiled CPU kernels, in each instruction set this CPU can run: the native build
(AVX-512 where the CPU has it), the AVX2 build (what an AVX2-only CPU such as an AMD EPYC of
the Zen 1-3 generations runs) and the portable scalar fallback. Each is compiled once a session."""

from __future__ import annotations

from types import ModuleType

import pytest

from ferry.kernels.build import cpu_flags, load_cpu_kernels

BUILDS = ["native", "avx2", "portable"]


@pytest.fixture(scope="session")
def ops() -> ModuleType:
    return load_cpu_kernels(isa="native")


@pytest.fixture(scope="session")
def avx2_ops() -> ModuleType:
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA: the avx2 build cannot run here")
    return load_cpu_kernels(isa="avx2")


@pytest.fixture(scope="session")
def portable_ops() -> ModuleType:
    # the same sources without AVX-512 or AVX2: the fallback loops an older CPU would run
    return load_cpu_kernels(isa="portable")


@pytest.fixture(params=BUILDS)
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    """Each build in turn: every test that takes it runs on all three."""
    return request.getfixturevalue({"native": "ops", "avx2": "avx2_ops",
                                    "portable": "portable_ops"}[request.param])
