"""Where the golden tests run, and how close to PEFT they must come there.

    LORAPLEX_TEST_DEVICE=cuda python -m pytest tests/test_family_bert.py   # the engine on the GPU

The engines under test run on `DEVICE` (the CPU unless LORAPLEX_TEST_DEVICE says otherwise), in float32;
PEFT, the reference, runs on the CPU in float32. `TOLERANCES` is how far apart the two may be, per device
and dtype: float32 rounding on the CPU; on CUDA, kernels that sum in another order (and may use TF32 where
allowed), and half precision's 10- or 7-bit mantissas.
"""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("LORAPLEX_TEST_DEVICE", "cpu")

TOLERANCES = {
    ("cpu", torch.float32): 1e-5,
    ("cuda", torch.float32): 5e-5,
    ("cuda", torch.float16): 2e-2,
    ("cuda", torch.bfloat16): 5e-2,
}


def tolerance(dtype: torch.dtype = torch.float32, device: str = DEVICE) -> float:
    """How far the engine on `device` in `dtype` may be from PEFT (fp32 probabilities or values)."""
    return TOLERANCES[(torch.device(device).type, dtype)]


TOLERANCE = tolerance()  # the golden tests' own: float32 on DEVICE
