"""Smoke test of an installed lowbit (a wheel in a fresh environment, away from the source tree).

    python smoke_wheel.py [--source-root DIR]     full check (needs torch)
    python smoke_wheel.py --raw [--expect-isa I]  the compiled kernels alone, no torch/numpy

Full check: lowbit imports from site-packages (not from DIR); backend_info(); every format's
linear (exact and fast CPU paths) and dequantize against lowbit.reference; lowbit._C does not
link against torch or libpython (readelf/ldd); then the same checks in a subprocess per ISA this
CPU runs, forced with LOWBIT_ISA, and a clean refusal for each compiled ISA it can't run.

--raw: loads lowbit/_C*.so by itself (pure Python + ctypes buffers: usable under qemu-x86_64
with an old -cpu model, where torch may not start) and checks dequantize bit-exact and linear
(both paths) against a Python reference for every format; --expect-isa asserts the ISA that
dispatch picked. Exit status 0 when everything passed; one line per check on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import sys

FAILURES = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


# ---- raw mode: the extension alone -----------------------------------------------------------
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982251167297, 0.5626170039176941,
       0.7229568362236023, 1.0)
# bitsandbytes' FP4 in code order (lowbit.formats.FP4_CODEBOOK): 0, 1/192, 8, 12, 4, 6, 2, 3 / 12,
# then the same negated (code 8 is -0.0)
FP4 = tuple(s * v for s in (1.0, -1.0) for v in (0.0, 0.0625 / 12, 8 / 12, 1.0, 4 / 12, 6 / 12, 2 / 12, 3 / 12))
CODEBOOK = {"nf4": NF4, "fp4": FP4}
FMT_ID = {"int8": 0, "int4": 1, "nf4": 2, "fp4": 3}


def f32(v: float) -> float:
    """Round a Python float to float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


def load_ext():
    spec = importlib.util.find_spec("lowbit")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lowbit is not installed")
    dirs = list(spec.submodule_search_locations)
    so = [f for d in dirs for f in glob.glob(os.path.join(d, "_C*.so")) + glob.glob(os.path.join(d, "_C*.pyd"))]
    if not so:
        raise SystemExit(f"no lowbit/_C extension in {dirs}")
    loader = importlib.machinery.ExtensionFileLoader("lowbit._C", so[0])
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("lowbit._C", loader))
    loader.exec_module(mod)
    return mod, so[0]


class RawWeight:
    """A random weight in one format, as ctypes buffers, with its decode in Python floats."""

    def __init__(self, fmt, N, K, group, symmetric, double_quant, rng):
        self.fmt, self.N, self.K, self.symmetric, self.double_quant = fmt, N, K, symmetric, double_quant
        self.group = K if group == -1 else group
        G = -(-K // self.group)
        self.G = G
        self.ld = K if fmt == "int8" else (K + 1) // 2
        codes = [[rng.randrange(-127, 128) if fmt == "int8" else rng.randrange(16) for _ in range(K)]
                 for _ in range(N)]
        self.data = (ctypes.c_uint8 * (N * self.ld))()
        for n in range(N):
            for k in range(K):
                c = codes[n][k]
                if fmt == "int8":
                    self.data[n * self.ld + k] = c & 0xFF
                else:
                    self.data[n * self.ld + k // 2] |= c << (4 * (k & 1))
        sc = [[f32(rng.uniform(0.01, 2.0)) for _ in range(G)] for _ in range(N)]
        self.zeros = None
        self.dq_scale = self.dq_offset = None
        if fmt in CODEBOOK and double_quant:
            C = -(-G // 256)
            step = [[f32(rng.uniform(0.001, 0.01)) for _ in range(C)] for _ in range(N)]
            lo = [[f32(rng.uniform(0.0, 0.5)) for _ in range(C)] for _ in range(N)]
            ac = [[rng.randrange(256) for _ in range(G)] for _ in range(N)]
            self.scales = (ctypes.c_uint8 * (N * G))(*[c for row in ac for c in row])
            self.dq_scale = (ctypes.c_float * (N * C))(*[v for row in step for v in row])
            self.dq_offset = (ctypes.c_float * (N * C))(*[v for row in lo for v in row])
            sc = [[f32(f32(ac[n][g] * step[n][g // 256]) + lo[n][g // 256]) for g in range(G)]
                  for n in range(N)]
        else:
            self.scales = (ctypes.c_float * (N * G))(*[v for row in sc for v in row])
        z = [[8] * G for _ in range(N)]
        if fmt == "int4" and not symmetric:
            z = [[rng.randrange(16) for _ in range(G)] for _ in range(N)]
            self.zeros = (ctypes.c_uint8 * (N * G))(*[v for row in z for v in row])
        self.w = []  # the decode, float32 values as Python floats
        for n in range(N):
            row = []
            for k in range(K):
                g, c, s = k // self.group, codes[n][k], sc[n][k // self.group]
                if fmt == "int8":
                    row.append(f32(c * s))
                elif fmt == "int4":
                    row.append(f32((c - z[n][g]) * s))
                else:
                    row.append(f32(f32(CODEBOOK[fmt][c]) * s))  # the codebook as float32, as stored
            self.w.append(row)

    def args(self):
        def p(b):
            return 0 if b is None else ctypes.addressof(b)
        return dict(fmt=FMT_ID[self.fmt], N=self.N, K=self.K, group=self.group,
                    symmetric=self.symmetric, double_quant=self.double_quant, data=p(self.data),
                    ld_data=self.ld, scales=p(self.scales), zeros=p(self.zeros),
                    dq_scale=p(self.dq_scale), dq_offset=p(self.dq_offset))


RAW_CASES = [("int8", -1, True, False), ("int4", 32, False, False), ("int4", 48, True, False),
             ("nf4", 64, True, False), ("nf4", 16, True, True), ("fp4", 64, True, False),
             ("fp4", 32, True, True)]


def run_raw(expect_isa):
    C, so = load_ext()
    isa = C.active_isa()
    print(f"lowbit._C {so}: active ISA {isa} ({C.active_reason()}); compiled {list(C.compiled_isas())}, "
          f"supported {list(C.supported_isas())}")
    if expect_isa:
        check(isa == expect_isa, f"dispatch picked {isa}, expected {expect_isa}")
    rng = random.Random(0)
    N, K, M = 5, 101, 3  # odd K, ragged last groups
    for fmt, group, sym, dq in RAW_CASES:
        name = f"{fmt} group {group}{' sym' if sym and fmt == 'int4' else ''}{' double-quant' if dq else ''}"
        w = RawWeight(fmt, N, K, group, sym, dq, rng)
        out = (ctypes.c_float * (N * K))()
        C.dequantize(**w.args(), out=ctypes.addressof(out), out_dtype=0, ldo=K, n_threads=2)
        got = [[out[n * K + k] for k in range(K)] for n in range(N)]
        check(got == w.w, f"raw dequantize {name} bit-exact")
        x = [[f32(rng.gauss(0, 1)) for _ in range(K)] for _ in range(M)]
        xb = (ctypes.c_float * (M * K))(*[v for row in x for v in row])
        ref = [[sum(x[m][k] * w.w[n][k] for k in range(K)) for n in range(N)] for m in range(M)]
        mag = [[sum(abs(x[m][k] * w.w[n][k]) for k in range(K)) for n in range(N)] for m in range(M)]
        y = (ctypes.c_float * (M * N))()
        C.linear(**w.args(), x=ctypes.addressof(xb), x_dtype=0, M=M, ldx=K, bias=0, y=ctypes.addressof(y),
                 y_dtype=0, ldy=N, n_threads=2)
        err = max(abs(y[m * N + n] - ref[m][n]) / (1e-5 * mag[m][n] + 1e-30) for m in range(M) for n in range(N))
        check(err <= 1.0, f"raw linear (exact path) {name}: worst error {err:.2g} of 1e-5 sum|x||w|")
        size = C.packed_size(w.args()["fmt"], N, K, w.group, w.symmetric, w.double_quant)
        if size:
            blob = (ctypes.c_uint8 * size)()
            C.pack(**w.args(), dst=ctypes.addressof(blob), dst_bytes=size, n_threads=2)
            C.linear_packed(ctypes.addressof(blob), size, FMT_ID[fmt], N, K, w.group, w.symmetric,
                            w.double_quant, ctypes.addressof(xb), 0, M, K, 0, ctypes.addressof(y), 0, N, 2)
            # activation quantization moves x_k by at most max|x| / 254; nf4's integer codebook
            # adds < 1e-4 of |w|; float32 sums 1e-5 of the magnitude
            worst = 0.0
            for m in range(M):
                amax = max(abs(v) for v in x[m])
                for n in range(N):
                    wabs = sum(abs(v) for v in w.w[n])
                    bound = wabs * amax / 254 + 2e-4 * mag[m][n] + 1e-4 * wabs * amax + 1e-30
                    worst = max(worst, abs(y[m * N + n] - ref[m][n]) / bound)
            check(worst <= 1.0, f"raw linear (fast path) {name}: worst error {worst:.2g} of its bound")
    return 0 if not FAILURES else 1


# ---- full mode: the installed package with torch ------------------------------------------------
def formats():
    return [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 128}),
            ("int4", {"symmetric": True, "group_size": 64}), ("nf4", {}), ("nf4", {"group_size": 32}),
            ("nf4", {"double_quant": True}), ("fp4", {}), ("fp4", {"double_quant": True})]


def check_formats(tag: str) -> None:
    import torch

    import lowbit
    from lowbit import _backend
    from lowbit import reference as R
    from lowbit.testing import assert_linear_close, fast_linear_mismatch

    torch.manual_seed(0)
    for fmt, opts in formats():
        name = f"{tag} {fmt} {opts}"
        w = torch.randn(48, 200)
        qw = lowbit.quantize_weight(w, fmt, **opts)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            check(torch.equal(lowbit.dequantize(qw, dt), R.dequantize(qw, dt)), f"{name} dequantize {dt} bit-exact")
        x = torch.randn(3, 7, 200)
        bias = torch.randn(48)
        ref = R.linear(x, qw, bias)
        _backend.set_cpu_path("exact")
        try:
            assert_linear_close(lowbit.linear(x, qw, bias), ref, x, qw, bias=bias)
            check(True, f"{name} linear (exact path) within lowbit.testing's tolerance")
        except AssertionError as e:
            check(False, f"{name} linear (exact path): {e}")
        _backend.set_cpu_path("fast")
        y = lowbit.linear(x, qw, bias)
        _backend.set_cpu_path(None)
        r = fast_linear_mismatch(y, ref, x, qw, bias=bias)
        rel = float((y - ref).norm() / ref.norm())
        check(r["ok"] and rel < 0.02, f"{name} linear (fast path): {r['worst_ratio']:.2g} of its bound, "
                                      f"relative L2 {rel:.1e}")


def linked_libraries(so: str):
    """DT_NEEDED entries of the extension (readelf), or ldd's list; None if neither exists."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
        return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    return None


def run_full(source_root):
    import lowbit
    from lowbit import _backend

    here = os.path.dirname(os.path.abspath(lowbit.__file__))
    print(f"lowbit {lowbit.__version__} from {here}")
    if source_root:
        src = os.path.realpath(source_root)
        check(not os.path.realpath(here).startswith(src + os.sep), f"lowbit imported from outside the source tree {src}")
    info = lowbit.backend_info()
    print(json.dumps(info))
    check(info["cpu_isa"] in info["supported_isas"], f"backend_info: cpu_isa {info['cpu_isa']} is supported here")
    so = _backend.ext().__file__
    libs = linked_libraries(so)
    if libs is None:
        print("skip linkage check: neither readelf nor ldd is available")
    else:
        print(f"{os.path.basename(so)} needs: {', '.join(libs)}")
        bad = [lib for lib in libs if any(t in lib for t in ("torch", "c10", "libpython", "cuda"))]
        check(not bad, f"lowbit._C does not link against torch / libpython / CUDA (found: {bad})")
    check_formats(f"[{info['cpu_isa']}, auto]")
    C = _backend.ext()
    for isa in C.compiled_isas():
        env = dict(os.environ, LOWBIT_ISA=isa)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-isa", isa], env=env,
                           capture_output=True, text=True)
        if isa in C.supported_isas():
            sys.stdout.write(r.stdout)
            check(r.returncode == 0, f"LOWBIT_ISA={isa}: every format passes (exit status {r.returncode})"
                  + ("" if r.returncode == 0 else "\n" + r.stderr[-2000:]))
        else:
            check(r.returncode != 0 and isa in r.stderr and "Traceback" in r.stderr and r.returncode > 0,
                  f"LOWBIT_ISA={isa} on a CPU without it: a clean Python error (exit {r.returncode}), not a crash")
    return 0 if not FAILURES else 1


def run_one_isa(isa):
    import lowbit
    info = lowbit.backend_info()
    check(info["cpu_isa"] == isa and "LOWBIT_ISA" in info["cpu_isa_reason"],
          f"LOWBIT_ISA={isa}: backend_info says {info['cpu_isa']} ({info['cpu_isa_reason']})")
    check_formats(f"[{isa}, forced]")
    return 0 if not FAILURES else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", action="store_true", help="check the extension alone (no torch)")
    ap.add_argument("--expect-isa", help="with --raw: the ISA dispatch must pick")
    ap.add_argument("--source-root", help="the source tree lowbit must NOT be imported from")
    ap.add_argument("--one-isa", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw:
        rc = run_raw(a.expect_isa)
    elif a.one_isa:
        rc = run_one_isa(a.one_isa)
    else:
        rc = run_full(a.source_root)
    print(f"{'smoke test passed' if rc == 0 else f'smoke test FAILED: {len(FAILURES)} check(s)'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
