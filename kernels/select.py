"""select(): which kernel and launch parameters run a given matmul, from tuned data or heuristics.

Kernels:
  ``gemv``       CUDA-core GEMV / split-K GEMV (kernels/gemv.py), float32 math: small M;
                 with ``IDOT`` in its parameters the integer-dot GEMV where it applies
  ``gemm``       fused tensor-core GEMM (kernels/gemm.py), fp16/bf16 activations: middle M
  ``dequant_mm`` dequantize (kernels/dequant.py) into a temporary weight in x's dtype, then
                 torch's matmul (cuBLAS): large M, where the one extra pass over the weight is
                 small next to the GEMM, and float32 activations beyond GEMV sizes (cuBLAS
                 float32 honours torch.backends.cuda.matmul.allow_tf32, off by default: no TF32
                 unless the user asked for it).

Tuned configs are data: ``kernels/configs/<gpu name>.json`` (written by bench/tune_gpu.py),
loaded once per GPU name, never autotuned at run time. Each record names its key fields:
format, variant, group, N, K, M bucket (M rounded up to a power of two, capped at 4096) and
activation class ("16bit" or "fp32"); the rest is the kernel and its parameters. Lookup: exact
key; else the record of the same format (or of its kernel twin, LEND_FORMATS: fp4 runs nf4's
kernels with another table), group and activation class nearest in (log N, log K, log2 M
bucket / 2), at most 4x away in M; else the heuristics below (also used for unknown cards and
under the Triton interpreter).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
KERNELS = ("gemv", "gemm", "dequant_mm")
# Formats whose kernels are the same code and cost with another table: a format without tuned
# records of its own borrows its twin's (at a small distance penalty, so its own win).
LEND_FORMATS = {"fp4": "nf4", "nf4": "fp4"}


@dataclass(frozen=True)
class Choice:
    kernel: str  # one of KERNELS
    params: Dict[str, object] = field(default_factory=dict)  # launch parameters
    source: str = "heuristic"  # "tuned", "nearest", "heuristic" or "variant" (kernels.plan)


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


def variant_of(fmt: str, symmetric: bool, double_quant: bool, zero_point: str = "int") -> str:
    if fmt == "int4":
        return "sym" if symmetric else ("float" if zero_point == "float" else "asym")
    if fmt in ("nf4", "fp4"):
        return "dq" if double_quant else "plain"
    if fmt == "int8" and not symmetric:
        return "asym"
    return "-"


def act_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def config_path(card: str) -> str:
    return os.path.join(CONFIG_DIR, re.sub(r"[^A-Za-z0-9._-]+", "_", card).strip("_") + ".json")


def record_key(r: dict) -> Tuple:
    return (r["format"], r["variant"], int(r["group"]), int(r["N"]), int(r["K"]),
            int(r["M_bucket"]), r.get("act", "16bit"))


_TABLES: Dict[str, Dict[Tuple, dict]] = {}


def load_table(card: str, path: Optional[str] = None) -> Dict[Tuple, dict]:
    """The tuned records for ``card`` by key (empty if there is no file for it)."""
    if path is None and card in _TABLES:
        return _TABLES[card]
    path = path or config_path(card)
    table: Dict[Tuple, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
        for r in doc.get("configs", []):
            table[record_key(r)] = r
    _TABLES[card] = table
    return table


def clear_cache() -> None:
    _TABLES.clear()
    _MEMO.clear()


_SM_COUNTS: Dict[str, int] = {}


def sm_count(device: Optional[torch.device]) -> int:
    if device is None or device.type != "cuda":
        return 132
    key = str(device)
    if key not in _SM_COUNTS:
        _SM_COUNTS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[key]


_NAMES: Dict[str, str] = {}


def card_name(device: torch.device) -> str:
    """The GPU's name as torch reports it ("interpreter" for CPU tensors under TRITON_INTERPRET)."""
    if device.type != "cuda":
        return "interpreter"
    key = str(device)
    if key not in _NAMES:
        _NAMES[key] = torch.cuda.get_device_name(device)
    return _NAMES[key]


# ---- heuristics ---------------------------------------------------------------------------
def _split_for(programs: int, k_steps: int, sms: int, per_sm: int = 2) -> int:
    """Split K until about ``per_sm`` programs per SM run, keeping >= 4 K steps per split.
    A divisor of the step count where one comes within 3/4 of that (every split full: no K
    masks in the kernel); else the wanted split with the last one shorter. (Divisors only
    left K = 11008, 86 blocks of 128 = 2 x 43, at 2 splits: 64 programs on 132 SMs, 0.29x of
    cuBLAS at M = 16 on the H200.)"""
    if programs >= per_sm * sms:
        return 1
    want = min(math.ceil(per_sm * sms / max(1, programs)), max(1, k_steps // 4), 16)
    div = max(d for d in range(1, want + 1) if k_steps % d == 0)
    if 4 * div >= 3 * want:
        return div
    steps = -(-k_steps // want)
    return -(-k_steps // steps)  # (no split left empty)


def heuristic(M: int, N: int, K: int, fmt: str, group: int, dtype: torch.dtype,
              sms: int = 132) -> Choice:
    """Untuned shapes and cards. Shaped after the H200 tuning (configs/NVIDIA_H200.json): the
    GEMV up to M = 2 (8 for float32 activations), the register-operand GEMM for int4 up to
    64, the full-tile GEMM for nf4 / fp4, the per-plane SWAP GEMM for the other formats up to
    64, the full-tile GEMM to 128, then dequantize + cuBLAS (the fused GEMM did not beat it at
    M >= 256 for 4-bit weights)."""
    bits = 8 if fmt == "int8" else 4
    kb = 16 * (32 // bits)  # elements per layout block
    nblk = -(-K // kb)
    if M <= (8 if dtype == torch.float32 else 2):
        if (fmt in ("int4", "int8", "nf4", "fp4") and dtype != torch.float32
                and (group < 0 or group >= K or group % kb == 0
                     or (fmt != "int8" and group == 64))):
            # the integer-dot GEMV (kernels/gemv.py): since its [CB, BN, 16] tiles (session
            # 13) ahead of the float32 one on every tuned H200 shape, int4, int8, nf4 and fp4
            # (codebooks as 14-bit integers); tuned configs use 4 warps and 2-4 programs per SM
            BN, CB = 32, 4
            split = _split_for(M * -(-N // BN), max(1, nblk // CB), sms, 4)
            return Choice("gemv", {"BN": BN, "CB": CB, "num_warps": 4, "num_stages": 1,
                                   "SPLIT_K": split, "IDOT": True})
        # small programs, many per SM (about 8: the H200 optimum at M = 1, kernels/NOTES.md)
        BN, CB = 32, (1 if fmt == "int4" else 2)
        split = _split_for(M * -(-N // BN), max(1, nblk // CB), sms, 8)
        return Choice("gemv", {"BN": BN, "CB": CB, "num_warps": 2, "num_stages": 1,
                               "SPLIT_K": split})
    if dtype == torch.float32:
        return Choice("dequant_mm")
    if M <= 64:
        BM = max(16, 1 << (M - 1).bit_length())
        programs = -(-M // BM) * -(-N // 128)
        if fmt == "int4" and (group < 0 or group >= K or group % 128 == 0):
            # the register-operand GEMM (kernels/gemm.py, gemm_rega): H200, M = 16 / 64,
            # 1.17-1.32x / 1.06-1.28x faster than the SWAP or full-tile GEMM configs tuned
            # before it (kernels/NOTES.md item 16)
            return Choice("gemm", {"BM": BM, "BN": 128, "CB": 1, "SWAP": True, "REGA": True,
                                   "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
                                   "SPLIT_K": _split_for(programs, nblk, sms,
                                                         6 if M <= 32 else 1)})
        if fmt in ("nf4", "fp4"):
            # codebook formats (H200 tuning of nf4 b64, session 16): the full-tile GEMM, two
            # blocks per step and BN 64 with x on the N side up to M = 16 (28672 x 4096 at
            # M = 16: 63.6 against 84.2 us for the per-plane SWAP GEMM below), x on the M side
            # above (M = 64: 74.4 against 121.6 us)
            if M <= 16:
                programs = -(-N // 64)
                return Choice("gemm", {"BM": 16, "BN": 64, "CB": 2, "SWAP": True, "GROUP_M": 8,
                                       "FULL_TILE": True, "num_warps": 4, "num_stages": 3,
                                       "SPLIT_K": _split_for(programs, max(1, nblk // 2), sms)})
            programs = -(-M // 64) * -(-N // 128)
            return Choice("gemm", {"BM": 64, "BN": 128, "CB": 1, "SWAP": False, "GROUP_M": 8,
                                   "FULL_TILE": True, "num_warps": 4, "num_stages": 3,
                                   "SPLIT_K": _split_for(programs, nblk, sms)})
        small_groups = fmt == "int4" and 0 < group < min(128, K)  # several per layout block
        if small_groups and M > 32:
            # int4 groups below a block (H200 tuning of groups of 32 / 64 at M = 64): the
            # full-tile GEMM with x as the MMA's M side, 46.6 against 93 us for the SWAP GEMM
            # below at 14336 x 4096
            programs = -(-M // 64) * -(-N // 128)
            return Choice("gemm", {"BM": 64, "BN": 128, "CB": 1, "SWAP": False, "GROUP_M": 8,
                                   "FULL_TILE": True, "num_warps": 4, "num_stages": 3,
                                   "SPLIT_K": _split_for(programs, nblk, sms)})
        if small_groups and group == 64:
            # the integer tensor-core GEMM with two groups per block (kernels/imma.py): the
            # per-plane SWAP GEMM ran int4 groups of 64 at 0.29-0.90x of cuBLAS at M = 16 on
            # untuned H200 shapes; tuned, IMMA won groups of 64 at M = 16 on every benchmark
            # shape (groups of 32, four per block, only 2 of 8 cases: the full-tile SWAP GEMM
            # below the others; kernels/NOTES.md item 25)
            BM = 16 if M <= 16 else 32
            programs = -(-M // BM) * -(-N // 64)
            return Choice("gemm", {"BM": BM, "BN": 64, "CB": 1, "SWAP": True, "IMMA": True,
                                   "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
                                   "SPLIT_K": _split_for(programs, nblk, sms, 4)})
        return Choice("gemm", {"BM": BM, "BN": 128, "CB": 1, "SWAP": True, "GROUP_M": 8,
                               "num_warps": 4, "num_stages": 3,
                               "SPLIT_K": _split_for(programs, nblk, sms),
                               # (groups of 32: the full-tile variant won 6 of 8 tuned cases)
                               **({"FULL_TILE": True} if small_groups and group == 32 else {})})
    if M <= 128:
        programs = -(-M // 64) * -(-N // 128)
        return Choice("gemm", {"BM": 64, "BN": 128, "CB": 1, "SWAP": False, "GROUP_M": 8,
                               "FULL_TILE": True, "num_warps": 4, "num_stages": 3,
                               "SPLIT_K": _split_for(programs, nblk, sms)})
    return Choice("dequant_mm")


# ---- lookup -------------------------------------------------------------------------------
def _params(r: dict) -> Dict[str, object]:
    return dict(r.get("params", {}))


def select(M: int, N: int, K: int, fmt: str, group: int, card: str, *,
           dtype: torch.dtype = torch.bfloat16, variant: str = "-", sms: int = 132,
           table: Optional[Dict[Tuple, dict]] = None) -> Choice:
    """The kernel for an [M, K] x [N, K]^T product of format ``fmt`` (group as stored, -1 =
    per row) on GPU ``card`` with activations of ``dtype``. Memoised per argument set (the
    run-time cost of a call is one dict lookup)."""
    if table is not None:
        return _select(M, N, K, fmt, group, card, dtype, variant, sms, table)
    key = (M, N, K, fmt, group, card, dtype, variant, sms)
    c = _MEMO.get(key)
    if c is None:
        if len(_MEMO) > 65536:
            _MEMO.clear()
        c = _MEMO[key] = _select(M, N, K, fmt, group, card, dtype, variant, sms, None)
    return c


_MEMO: Dict[Tuple, Choice] = {}


def _select(M, N, K, fmt, group, card, dtype, variant, sms, table) -> Choice:
    act = act_class(dtype)
    mb = m_bucket(M)
    table = load_table(card) if table is None else table
    if table:
        r = table.get((fmt, variant, group, N, K, mb, act))
        if r is not None:
            return _checked(Choice(r["kernel"], _params(r), "tuned"), dtype)
        best, best_d = None, (math.inf,)
        twin = LEND_FORMATS.get(fmt)
        for key, r in table.items():
            if (key[0] != fmt and key[0] != twin) or key[2] != group or key[6] != act:
                continue
            dm = abs(math.log2(key[5] / mb))
            if dm > 2:  # a config tuned for M 4x away is no better than the heuristics
                continue
            if (key[5] <= 2) != (mb <= 2):  # the GEMV's M range and the GEMMs' do not lend
                continue
            d = (abs(math.log(key[3] / N)) + abs(math.log(key[4] / K)) + 0.5 * dm
                 + (0.01 if key[1] != variant else 0.0) + (0.02 if key[0] != fmt else 0.0))
            # ties (an M bucket halfway between two tuned ones) go to the smaller M bucket,
            # then the smaller shape: the choice must not depend on the file's record order
            d = (round(d, 9), key[5] > mb, key[3], key[4], key[1], key[0])
            if d < best_d:
                best, best_d = r, d
        if best is not None:
            return _checked(Choice(best["kernel"], _params(best), "nearest"), dtype)
    return heuristic(M, N, K, fmt, group, dtype, sms)


def _checked(c: Choice, dtype: torch.dtype) -> Choice:
    # The fused tensor-core kernel takes 16-bit activations only.
    if c.kernel == "gemm" and dtype == torch.float32:
        return Choice("dequant_mm", {}, c.source)
    return c


def choices_for(records: List[dict]) -> Dict[Tuple, dict]:
    """Index a list of records like a loaded table (for tools and tests)."""
    return {record_key(r): r for r in records}
