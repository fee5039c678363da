"""The CMake build (CMakeLists.txt, same csrc/SOURCES) loads through torch.ops.load_library and runs the
CPU kernels. `make test` builds it first (`make cmake-build`); run that by hand otherwise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.environ.get("SAK_CMAKE_LIBRARY", os.path.join(ROOT, "build", "cmake", "libsparseadapter_kernels.so"))

pytestmark = pytest.mark.skipif(not os.path.exists(LIBRARY),
                                reason=f"no CMake build at {LIBRARY} (run `make cmake-build`)")

SCRIPT = r"""
import sys
import torch, sparseadapter_kernels as sak
from sparseadapter_kernels._extension import EXTENSION
assert EXTENSION.loaded and EXTENSION.source == LIB, (EXTENSION.source, EXTENSION.error)
assert EXTENSION.has_cpu and sak.backend_status()["cpu"][0]
sys.path.insert(0, "python_tests")
from conftest import assert_kernel_close, randn, random_sparse
g = torch.Generator().manual_seed(0)
for layout, block, shape, sparsity in (("csr", None, (40, 72), 0.6), ("bsr", (8, 24), (48, 96), 0.5)):
    w64, dense = random_sparse(shape, sparsity, torch.float64, layout=layout, block_size=block, generator=g)
    for dtype in (torch.float32, torch.float64):
        x = randn(37, shape[1], dtype=dtype, generator=g).requires_grad_(True)
        y = sak.ops.sparse_linear(x, w64.to(dtype), backend="cpu")
        assert_kernel_close(y, x.detach().double() @ dense.T, dtype, what=f"{layout} forward")
        y.sum().backward()
        assert_kernel_close(x.grad, dense.sum(0).expand(37, -1), dtype, what=f"{layout} grad x")
print("cmake build OK from", EXTENSION.source)
"""


def test_cmake_library_runs_the_cpu_kernels():
    env = dict(os.environ, SPARSEADAPTER_KERNELS_LIBRARY=LIBRARY, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", f"LIB = {LIBRARY!r}\n" + SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cmake build OK" in proc.stdout
