"""Shared test setup: one CPU thread and a fixed seed for every test.

One thread because the CI machine has two cores shared with other jobs: with torch's default
(one thread per core) small convolutions spend most of their time waiting on each other, and the
suite runs an order of magnitude slower.
"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# No installed plugin loads unless a test asks for it (TIMM_QCONV_PLUGINS empty), so that results
# do not depend on what happens to be installed. Set here, before test modules are collected,
# because they read the method registry at import. An explicit value is kept:
# `TIMM_QCONV_PLUGINS=apot make test` runs the registry-parametrized tests on the apot plugin too.
import os  # noqa: E402

os.environ.setdefault("TIMM_QCONV_PLUGINS", "")
# The eager kernels (the default) unless a test asks for others: compiling for every model shape
# the suite trains takes long (tests/test_kernels.py covers the compiled and auto backends). An
# explicit value is kept: `TIMM_QCONV_KERNELS=compiled pytest tests/test_accelerate.py` runs the
# two-process test on the compiled path.
os.environ.setdefault("TIMM_QCONV_KERNELS", "eager")
