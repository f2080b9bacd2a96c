#!/usr/bin/env bash
# One run on a lent GPU machine (no network): builds lowbit there, runs the GPU tests at real
# sizes, the GPU benchmark (with bitsandbytes / GemLite when carried), the C++ kernel tests on
# the host CPU (AVX-512 there), and the CPU benchmark pinned to 2 cores with the peers.
#
#   scripts/device_run.sh SECTIONS OUT      SECTIONS: comma list of gpu-tests,gpu-bench,tune,lab,
#                                           cpu-tests,cpu-bench,decode,tp
# Peers travel as wheels (.whl/, see the device tool's README) and GemLite's pure-Python source
# (.devrun/peers/gemlite); both are optional.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECTIONS=${1:-gpu-tests,gpu-bench,cpu-tests,cpu-bench}
OUT=${2:-/tmp/lowbit-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
has() { [[ ",$SECTIONS," == *",$1,"* ]]; }

stamp start
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
lscpu | grep -E "Model name|^CPU\(s\)" | tr -s ' '

SITE=/tmp/site
mkdir -p $SITE
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  # wheels for this Python only (the folder may hold several versions' builds of a package)
  PYTAG=cp$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
  WHEELS=$(ls "$ROOT"/.whl/*.whl | grep -E -- "-(py3-none|py2.py3-none|[a-z0-9]+-abi3|$PYTAG-$PYTAG)-" )
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS
fi
[[ -d "$ROOT/.devrun/peers" ]] && export PYTHONPATH=$ROOT/.devrun/peers${PYTHONPATH:+:$PYTHONPATH}
stamp "build lowbit (extension + kernels) into $SITE"
CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps --no-cache-dir \
  --target $SITE "$ROOT" >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import lowbit, json; print(json.dumps(lowbit.backend_info()))"

if has gpu-tests; then
  stamp "GPU tests at real sizes"
  LOWBIT_TEST_REAL_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 \
    tests/test_gpu_kernels.py -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if has lab; then
  stamp "kernel lab: bench/gpu_lab.py ${LAB_ARGS:-}"
  timeout ${LAB_TIMEOUT:-400} python3 bench/gpu_lab.py ${LAB_ARGS:-} --json "$OUT/lab.json" 2>&1 | grep -v -i warn | tee "$OUT/lab.log" | tail -60
fi
if has tune; then
  stamp tune
  CARD=$(python3 -c "import torch,re; print(re.sub(r'[^A-Za-z0-9._-]+','_',torch.cuda.get_device_name(0)).strip('_'))")
  timeout 280 python3 bench/tune_gpu.py --jobs 12 --out "$OUT/$CARD.json" 2>&1 | tail -5
  cp "$OUT/$CARD.json" $SITE/lowbit/kernels/configs/ 2>/dev/null
fi
if has gpu-bench; then
  stamp "GPU benchmark"
  timeout 300 python3 -m lowbit.cli bench --device cuda --json "$OUT/bench_gpu.json" \
    --plot "$OUT/bench_gpu.png" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -70
fi
if has cpu-tests; then
  stamp "C++ kernel tests on the host CPU"
  cmake -S "$ROOT" -B /tmp/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_BUILD_PYTHON=OFF \
    -DLOWBIT_BUILD_TESTS=ON >"$OUT/cpp_build.log" 2>&1 && cmake --build /tmp/cpp -j 16 >>"$OUT/cpp_build.log" 2>&1 \
    || tail -20 "$OUT/cpp_build.log"
  /tmp/cpp/lowbit_kernel_tests >"$OUT/cpp_tests.log" 2>&1; echo "rc=$? $(tail -1 "$OUT/cpp_tests.log")"
  grep -E "^FAIL" "$OUT/cpp_tests.log" | head -10
fi
if has cpu-bench; then
  stamp "CPU benchmark, 2 cores pinned"
  for P in exact fast; do
    taskset -c 2,3 timeout 420 python3 -m lowbit.cli bench --full --threads 2 --cpu-path $P --reps 10 \
      --max-seconds 1 --no-progress --json "$OUT/bench_cpu_$P.json" --plot "$OUT/bench_cpu_$P.png" \
      2>&1 | grep -v -i warn | tee "$OUT/bench_cpu_$P.log" | tail -80
  done
fi
if has cpu-bench-short; then
  stamp "CPU benchmark (short), 2 cores pinned"
  for P in exact fast; do
    taskset -c 2,3 timeout 250 python3 -m lowbit.cli bench --shapes 4096x4096 --m 1,8,32,128 --peers \
      --threads 2 --cpu-path $P --reps 8 --max-seconds 0.6 --no-progress --json "$OUT/bench_cpu_$P.json" \
      2>&1 | grep -v -i warn | tee "$OUT/bench_cpu_$P.log" | tail -40
  done
  taskset -c 2,3 timeout 100 python3 -m lowbit.cli bench --shapes 4096x4096 --m 1 --threads 2 --cpu-path fast \
    --dtype bf16 --impls int8,int4-g128,nf4-b64,torch-fp32,torch-int4pack --reps 8 --no-limits --no-progress 2>&1 | tail -8
  taskset -c 2 timeout 100 python3 -m lowbit.cli bench --shapes 4096x4096 --m 8,32,128 --threads 1 --cpu-path fast \
    --impls int8,int4-g128,nf4-b64,torch-fp32 --reps 6 --no-limits --no-progress 2>&1 | tail -14
fi
if has tp; then
  stamp "tensor-parallel benchmark"
  NCCL_NVLS_ENABLE=0 timeout 400 python3 bench/tp.py ${TP_ARGS:-} --json "$OUT/bench_tp.json" 2>&1 | tail -40
fi
stamp done
