"""Test-session set-up shared by every test module.

Triton's interpreter must be chosen before ``triton`` is first imported: on machines without a
CUDA GPU the Triton kernels are tested on the CPU through ``TRITON_INTERPRET=1``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)
