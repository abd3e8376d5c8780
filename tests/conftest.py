"""Suite-wide settings.

One torch intra-op thread: the suite's models are tiny, and on the 2-core CI machines a second
thread costs more than it gives (tests/test_sdxl_precision.py + tests/test_lora.py: 84 s with
two threads, 71 s with one). LDMRT_TEST_TORCH_THREADS=N sets another count (slow, full-size
cases may want all cores).
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("LDMRT_TEST_TORCH_THREADS", "1")))
