"""Shared test settings. Tests use tiny models, for which one thread is fastest (and robust on busy machines).

`tests/` mirrors `src/hybridmoe/` (tests/kernels for hybridmoe/kernels, tests/serve for hybridmoe/serve, ...). Test
modules import shared fixtures from one another by module name (`from test_server import make_checkpoint`), so
every test folder is on sys.path; test file names are unique across folders.
"""

import os
import sys

import torch

torch.set_num_threads(1)

_HERE = os.path.dirname(os.path.abspath(__file__))
for _root, _dirs, _files in os.walk(_HERE):
    _dirs[:] = sorted(d for d in _dirs if not d.startswith((".", "__")))
    if _root not in sys.path:
        sys.path.insert(0, _root)
