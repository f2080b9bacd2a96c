#!/usr/bin/env bash
# CPU speed check for issue 3 on one machine (meant for the AVX-512 host), in about 6 minutes,
# from a checkout where lowbit is built and importable (pip install -e . or a wheel):
#   1. the C++ kernel tests (every ISA this CPU runs), built in build/cpu-device;
#   2. the C++ fast path at M = 1 beside a plain streaming read of the same packed bytes on the
#      same pool and task split (lowbit_bench --stream), 1 and 2 threads, fp32 and bf16;
#   3. `lowbit bench` over the issue's shapes (K x N: 4096x4096, 4096x11008, 11008x4096) and
#      M = 1, 8, 32, 128 on 2 pinned threads: the fast path with the peers (torch dynamic int8,
#      torch's int4 / int8 ops, bitsandbytes if installed), the exact path, and bf16 activations
#      at M = 1 on both paths.
# Everything is printed and also kept under OUTDIR (logs and JSON).
#
#   scripts/cpu_device_bench.sh [OUTDIR]          (default /tmp/lowbit-cpu-bench)
# Environment: PYTHON (default: .venv/bin/python if present, else python3), CPUS (the cores to
# pin to, default "2,3" when the machine has 4 or more, else "0,1"; "none": no pinning).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-/tmp/lowbit-cpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
NPROC=$(nproc 2>/dev/null || echo 2)
CPUS=${CPUS:-}
if [[ -z $CPUS ]]; then
  if [[ $NPROC -ge 4 ]]; then CPUS=2,3; else CPUS=0,1; fi
fi
PIN=()
if [[ $CPUS != none ]] && command -v taskset >/dev/null 2>&1; then PIN=(taskset -c "$CPUS"); fi
PIN1=()  # one core of the two, for the 1-thread rows
if [[ ${#PIN[@]} -gt 0 ]]; then PIN1=(taskset -c "${CPUS%%,*}"); fi

stamp "machine"
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|L3" | tr -s ' '
echo "x86 extensions: $(grep -o -w 'avx2\|avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
echo "pinning: ${PIN[*]:-none} (nproc $NPROC)"
"$PY" -c "import torch, lowbit; from lowbit import _backend as B; C = B.ext(); print('torch', torch.__version__, '| lowbit ISA', C.active_isa(), '(', C.active_reason(), ') | compiled', C.compiled_isas(), '| supported', C.supported_isas())" \
  || { echo "lowbit is not importable with $PY: build it first (pip install --no-build-isolation -e .)"; exit 1; }

stamp "C++ kernel tests (build/cpu-device)"
BUILD=$ROOT/build/cpu-device
gen=()
if [[ ! -f $BUILD/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLOWBIT_BUILD_PYTHON=OFF \
    -DLOWBIT_BUILD_TESTS=ON >"$OUT/cpp_build.log" 2>&1 &&
   cmake --build "$BUILD" --target lowbit_kernel_tests lowbit_bench -j "$NPROC" >>"$OUT/cpp_build.log" 2>&1; then
  timeout 240 "$BUILD/lowbit_kernel_tests" >"$OUT/cpp_tests.log" 2>&1
  echo "rc=$? $(grep -E '^(compiled|supported) ISAs' "$OUT/cpp_tests.log" | tr '\n' ' ') $(tail -1 "$OUT/cpp_tests.log")"
  grep -E "^FAIL" "$OUT/cpp_tests.log" | head -20
else
  echo "C++ build failed:"; tail -30 "$OUT/cpp_build.log"
fi

ISA=$("$PY" -c "from lowbit import _backend as B; print(B.ext().active_isa())")
if [[ -x $BUILD/lowbit_bench ]]; then
  # lowbit_bench takes N x K shapes; "read" rows: a streaming read of the same packed bytes
  stamp "C++ fast path at M = 1 vs a streaming read of the same bytes ($ISA; 1 and 2 threads)"
  R=(--reps 15 --max-seconds 0.4 --stream --paths fast --m 1)
  timeout 120 "${PIN[@]}" "$BUILD/lowbit_bench" --isa "$ISA" --shapes 4096x4096,11008x4096,4096x11008 \
    --threads 1,2 "${R[@]}" 2>&1 | tee "$OUT/cpp_m1_f32.txt"
  timeout 60 "${PIN[@]}" "$BUILD/lowbit_bench" --isa "$ISA" --shapes 4096x4096 --threads 2 --xdtype bf16 \
    "${R[@]}" 2>&1 | tee "$OUT/cpp_m1_bf16.txt"
  if [[ $ISA != avx2 ]]; then
    stamp "C++ fast path, the AVX2 kernels on this CPU (the 'within 2x of AVX-512' target)"
    timeout 60 "${PIN[@]}" "$BUILD/lowbit_bench" --isa avx2 --shapes 4096x4096 --m 1,32,128 --threads 2 \
      --paths fast --reps 8 --max-seconds 0.4 2>&1 | tee "$OUT/cpp_avx2.txt"
  fi
  if [[ $ISA != avx2vnni ]] && "$PY" -c "from lowbit import _backend as B; import sys; sys.exit('avx2vnni' not in B.ext().supported_isas())"; then
    stamp "C++ fast path, the AVX-VNNI kernels on this CPU (what an Intel laptop without AVX-512 runs)"
    timeout 60 "${PIN[@]}" "$BUILD/lowbit_bench" --isa avx2vnni --shapes 4096x4096 --m 1,32,128 --threads 2 \
      --paths fast --reps 8 --max-seconds 0.4 2>&1 | tee "$OUT/cpp_avx2vnni.txt"
  fi
fi

LB=("$PY" -m lowbit.cli bench --threads 2 --no-progress)
SH=4096x4096,4096x11008,11008x4096
stamp "lowbit bench: fast path + peers, fp32 activations, 2 threads"
timeout 200 "${PIN[@]}" "${LB[@]}" --shapes $SH --m 1,8,32,128 --peers --cpu-path fast --stream \
  --reps 8 --max-seconds 0.4 --json "$OUT/bench_fast.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_fast.log"

stamp "lowbit bench: exact path, fp32 activations, 2 threads"
timeout 90 "${PIN[@]}" "${LB[@]}" --shapes $SH --m 1,8,32,128 --impls int8,int4-g128,nf4-b64,torch-fp32 \
  --cpu-path exact --no-limits --stream --reps 6 --max-seconds 0.3 --json "$OUT/bench_exact.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/bench_exact.log"

for P in fast exact; do
  stamp "lowbit bench: $P path, bf16 activations, M = 1, 2 threads"
  timeout 60 "${PIN[@]}" "${LB[@]}" --shapes $SH --m 1 --dtype bf16 --cpu-path $P --no-limits \
    --impls int8,int4-g128,nf4-b64,torch-bf16,torch-int4pack --reps 8 --max-seconds 0.4 \
    --json "$OUT/bench_bf16_$P.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_bf16_$P.log"
done

stamp "lowbit bench: fast path, 1 thread (for the 1 -> 2 thread scaling at M >= 8)"
timeout 60 "${PIN1[@]}" "$PY" -m lowbit.cli bench --threads 1 --no-progress --shapes 4096x4096 --m 8,32,128 \
  --impls int8,int4-g128,nf4-b64,torch-dyn-int8 --cpu-path fast --no-limits --reps 6 --max-seconds 0.4 \
  --json "$OUT/bench_fast_1thread.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_fast_1thread.log"

stamp "done; logs and JSON in $OUT"
