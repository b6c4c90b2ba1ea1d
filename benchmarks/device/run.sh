#!/usr/bin/env bash
# Run THERE, on the device machine of a lent GPU session (issue 16), from the repository root, with the wheels of
# benchmarks/device/wheels.sh carried:
#   run(command="bash benchmarks/device/run.sh setup tests", carry=[".whl"], timeout_s=590)
#   run(command="bash benchmarks/device/run.sh bench", carry=[".whl"], timeout_s=590)   # at once: warm for 30 s
# Stages, in the order given (default: setup tests bench; a later stage runs setup first where it is missing):
#   setup  installs .whl into /tmp/site (first on PYTHONPATH, after src/), stands in for mamba-ssm's Mamba-1 CUDA
#          extension (never called; its __init__ imports it), and compiles causal-conv1d's extension for this GPU
#   tests  tests/kernels, the decode graphs, bench_gpu's test and the NVFP4 emulation on the device: each kernel
#          against its twin on CUDA (not the Triton interpreter's tests, which stand in for a GPU on CPUs)
#   bench  benchmarks/bench_gpu.py with BENCH_ARGS (default: everything), its JSON and table into $OUT
# Everything printed also goes to $OUT/device.log; the pytest log, gpu.json and gpu.md come back beside it. Copy
# those into benchmarks/results/ here. `--smoke` first runs the same stages on a CPU (no build; bench --smoke).
set -uo pipefail
cd "$(dirname "$0")/../.."
smoke=0
[[ ${1:-} == --smoke ]] && { smoke=1; shift; }
stages=("${@:-setup tests bench}")
stages=(${stages[*]})
out=${OUT:-/tmp/device-out}
site=${SITE:-/tmp/site}
python=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee -a "$out/device.log") 2>&1
export PYTHONPATH="$PWD/src:$site" PYTHONUNBUFFERED=1
t_start=$SECONDS
stamp() { echo "=== [$((SECONDS - t_start)) s] $*"; }

setup() {
  [[ -f $site/.ready ]] && { stamp "setup: $site is ready"; return; }
  stamp "setup"
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl ||
    { echo "installing .whl failed"; exit 1; }
  # mamba_ssm/__init__.py imports `selective_scan_cuda`, the Mamba-1 scan's CUDA extension, which the wheel built
  # without (wheels.sh); hybridmoe calls only the Triton SSD scan (mamba_ssm.ops.triton.ssd_combined).
  echo '"""Stand-in for mamba-ssm'"'"'s Mamba-1 CUDA extension, which hybridmoe never calls."""' >"$site/selective_scan_cuda.py"
  if ((smoke)); then
    echo "smoke: causal-conv1d's extension is not built (no GPU)"
  else
    timeout 300 "$python" benchmarks/device/build_causal_conv1d.py .whl/src/causal_conv1d-*.tar.gz "$site" ||
      echo "causal-conv1d's build failed: the conv runs its PyTorch path (see above)"
  fi
  "$python" - <<'PY'
import importlib, importlib.metadata as md, torch
print(f"python3 {__import__('sys').version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda},",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "triton", "mamba_ssm", "causal_conv1d", "huggingface_hub", "tokenizers", "fastapi"):
    try:
        importlib.import_module(name if name != "mamba_ssm" else "mamba_ssm.ops.triton.ssd_combined")
        print(f"  {name} {md.version(name)} imports")
    except Exception as e:
        print(f"  {name}: {type(e).__name__}: {e}")
import hybridmoe
print(f"  hybridmoe from {hybridmoe.__file__}")
PY
  touch "$site/.ready"
}

tests() {
  [[ -f $site/.ready ]] || setup
  stamp "tests"
  timeout 420 "$python" -m pytest -q -p no:cacheprovider -rs tests/kernels tests/serve/test_decode_graphs.py \
    tests/test_bench_gpu.py tests/quant/test_nvfp4_device.py -k "not interpreter" 2>&1 | tee "$out/pytest.log"
  stamp "tests: exit ${PIPESTATUS[0]}"
}

bench() {
  [[ -f $site/.ready ]] || setup
  stamp "bench"
  local args=${BENCH_ARGS:-}
  ((smoke)) && args="--smoke $args"
  # shellcheck disable=SC2086
  timeout 560 "$python" benchmarks/bench_gpu.py $args --out "$out/gpu.json"
  stamp "bench: exit $?"
}

for stage in "${stages[@]}"; do
  case $stage in
    setup | tests | bench) $stage ;;
    *) echo "unknown stage $stage: use setup, tests, bench"; exit 2 ;;
  esac
done
stamp "done"
