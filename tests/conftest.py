"""Suite-wide settings.

One torch intra-op thread: the suite's models are tiny, and on the 2-core CI machines a second
thread costs more than it gives (tests/test_sdxl_precision.py + tests/test_lora.py: 84 s with
two threads, 71 s with one). LDMRT_TEST_TORCH_THREADS=N sets another count (slow, full-size
cases may want all cores).
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("LDMRT_TEST_TORCH_THREADS", "1")))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embed_library(tmp_path_factory):
    """libldmrt.so built once for the C ABI tests (tests/embed_support.py): its folder."""
    from tests.embed_support import build_library
    return build_library(tmp_path_factory.mktemp("libldmrt")).parent


@pytest.fixture(scope="session")
def embed_digits(tmp_path_factory):
    """The built-in digits bundle, exported once for the C ABI tests."""
    from tests.embed_support import export_digits
    return export_digits(tmp_path_factory.mktemp("embed") / "digits")
