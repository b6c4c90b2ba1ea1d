#!/usr/bin/env bash
# Run HERE, on the development machine, before a lent GPU session: puts into .whl/ what the device machine lacks, so
# that one `run` of benchmarks/device/run.sh installs it there without a package registry (the device machine reaches
# none). Usage: bash benchmarks/device/wheels.sh [PYTHON_VERSION, default 3.12: the device image's python3]
#
# What goes in (about 35 MB; the device tool carries at most 64 MiB a call):
# - hybridmoe's dependencies at CI's pins (.ci/constraints.txt), the device image's newer or older copies shadowed
#   (its transformers 5.17 predates the nemotron_h hybridmoe matches, 5.25), less the packages the image already
#   holds in builds it needs (torch, triton, numpy, pyarrow, matplotlib: --exclude below);
# - mamba-ssm's python files (its Triton SSD scan, kernels/ssd_cuda.py) as a wheel built here without its CUDA
#   extension (MAMBA_SKIP_CUDA_BUILD: that extension is Mamba-1's selective scan, which hybridmoe never calls, and
#   takes far longer to build than a lent session lasts);
# - causal-conv1d's source: run.sh compiles its CUDA extension there for the GPU's architecture alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
pyver=${1:-3.12}
dest=.whl
mamba=mamba-ssm==2.3.2.post1
conv=causal-conv1d==1.7.0
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >>.git/info/exclude; }
rm -rf "$dest" && mkdir -p "$dest/src"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
target=(--only-binary=:all: --python-version "$pyver" --implementation cp "${platforms[@]}")
deps=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
exclude='^(torch|triton|numpy|pyarrow|matplotlib|contourpy|cycler|fonttools|kiwisolver|pillow|pyparsing|python-dateutil|six)$'
keep=()
for req in $deps einops; do
  name=$(python3 -c 'import re, sys; print(re.split(r"[<>=!~;\[ ]", sys.argv[1])[0].lower())' "$req")
  [[ $name =~ $exclude ]] || keep+=("$req")
done
# The whole closure at CI's pins, resolved for the device's python, then each wheel fetched without its needs.
report=$(mktemp)
python3 -m pip install --quiet --dry-run --ignore-installed --target "$(mktemp -d)" --report "$report" \
  "${target[@]}" -c .ci/constraints.txt "${keep[@]}"
python3 - "$report" "$exclude" >"$dest/requirements.txt" <<'PY'
import json, re, sys
report, exclude = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if not exclude.match(name):
        print(f"{name}=={item['metadata']['version']}")
PY
python3 -m pip download --quiet --no-deps "${target[@]}" -d "$dest" -r "$dest/requirements.txt"
# mamba-ssm and causal-conv1d publish sources only; building mamba-ssm's wheel needs torch (a CPU build will do).
python3 - "$conv" "$dest/src" <<'PY'
import hashlib, json, sys, urllib.request
name, version = sys.argv[1].split("==")
index = urllib.request.Request(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(index, timeout=60))["files"]
sdist = next(f for f in files if f["filename"] == f"{name.replace('-', '_')}-{version}.tar.gz")
data = urllib.request.urlopen(sdist["url"], timeout=120).read()
if hashlib.sha256(data).hexdigest() != sdist["hashes"]["sha256"]:
    raise SystemExit(f"{sdist['filename']}: its sha256 differs from the index's")
open(f"{sys.argv[2]}/{sdist['filename']}", "wb").write(data)
PY
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip wheel --quiet --no-deps --no-build-isolation \
  -w "$dest" "$mamba"
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest (carry it: \"carry\": [\".whl\"])"
