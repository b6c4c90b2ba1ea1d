"""Shared test settings. Tests use tiny models, for which one thread is fastest (and robust on busy machines).

`tests/` mirrors `src/hybridmoe/` (tests/kernels for hybridmoe/kernels, tests/serve for hybridmoe/serve, ...). Test
modules import shared fixtures from one another by module name (`from test_server import make_checkpoint`), so
every test folder is on sys.path; test file names are unique across folders.
"""

import os
import sys

import pytest
import torch

torch.set_num_threads(1)

# `pytest -n 2 --dist loadgroup` (CI): each test module is one xdist group, run in order on one worker, so that its
# module-scoped fixtures (servers, checkpoints) are built once and its tests see one another's effects as they do
# without workers. The modules that start several processes (torchrun, `ranks.start_ranks`, bench_gpu's workers)
# keep a 2-core machine's cores busy by themselves: they form one group together, run one after another.
MULTIPROCESS = {
    "test_automodel_distributed.py", "test_finetune_distributed.py", "test_context_parallel.py", "test_mesh.py",
    "test_pipeline_parallel.py", "test_resume_layouts.py", "test_tensor_parallel.py",
    "test_expert_parallel_overlap.py", "test_bench_gpu.py", "test_distributed.py", "test_plan.py",
    "test_async_rollout_distributed.py", "test_rl_distributed.py", "test_sft_distributed.py",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "multiprocess" if item.path.name in MULTIPROCESS else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


_HERE = os.path.dirname(os.path.abspath(__file__))
for _root, _dirs, _files in os.walk(_HERE):
    _dirs[:] = sorted(d for d in _dirs if not d.startswith((".", "__")))
    if _root not in sys.path:
        sys.path.insert(0, _root)
