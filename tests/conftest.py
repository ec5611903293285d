import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a CUDA device under test, Triton kernels run in its interpreter. Triton reads this once, when a
# library first imports it (torch's own modules may do so in any test), so it is set before any test runs.
if not os.environ.get("LORAPLEX_TEST_DEVICE", "").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def workers(request) -> list[str]:
    """`--workers N` for a module's server: its tests run against one HTTP worker, then against two."""
    return ["--workers", str(request.param)]
