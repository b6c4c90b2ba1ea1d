"""Compile Dao-AILab/causal-conv1d's CUDA extension for this machine's GPU alone and install it, with the package's
python files, into a folder on PYTHONPATH (benchmarks/device/run.sh's setup stage).

Its setup.py compiles for nine GPU architectures, several times the time a lent GPU session can spare; this builds
the same sources with the same nvcc flags for one (`torch.cuda.get_device_capability()`), through torch's own
`torch.utils.cpp_extension.load` (ninja).

    python benchmarks/device/build_causal_conv1d.py .whl/src/causal_conv1d-1.7.0.tar.gz /tmp/site
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

# setup.py's nvcc flags, less its list of architectures.
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
]
SOURCES = ["causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", help="causal_conv1d-VERSION.tar.gz")
    parser.add_argument("target", help="the folder to install into (a PYTHONPATH entry)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: causal-conv1d's extension is built for the GPU it will run on")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="causal_conv1d_") as tmp:
        with tarfile.open(args.sdist) as tar:
            tar.extractall(tmp, filter="data")
        (root,) = [os.path.join(tmp, d) for d in os.listdir(tmp)]
        build = os.path.join(tmp, "build")
        os.makedirs(build)
        load(
            name="causal_conv1d_cuda",
            sources=[os.path.join(root, "csrc", s) for s in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=[*NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            build_directory=build,
        )
        os.makedirs(args.target, exist_ok=True)
        shutil.copy(os.path.join(build, "causal_conv1d_cuda.so"), args.target)
        shutil.copytree(os.path.join(root, "causal_conv1d"), os.path.join(args.target, "causal_conv1d"),
                        dirs_exist_ok=True)  # fmt: skip
    print(f"causal_conv1d_cuda built for sm_{arch} in {time.perf_counter() - t0:.0f} s, installed in {args.target}")


if __name__ == "__main__":
    main()
