"""Perplexity cost of an activation rounding that a kernel makes, emulated on the CPU.

- ``--emulate idot`` (default): the GPU integer-dot GEMV (kernels/gemv.py) multiplies
  16-bit-quantized activations: every quantized layer's input is replaced by
  ``lowbit.testing.gpu_quantize_activations`` (the same quantization, in torch); for nf4 also
  its codebook as 14-bit integers (the difference added to the layer's output).
- ``--emulate bf16``: the CPU tile path (AMX, csrc/kernel_api.h "tile path") rounds the
  activations to bfloat16 (at M >= 16 rows, i.e. every prefill chunk of the perplexity run).

It runs the bundled model (or --model) through ``lowbit eval``'s perplexity on the exact path,
with and without the emulated rounding. Needs the eval extras.

    python bench/idot_perplexity.py int4:g128 int4:g64 int8 [--tokens 16384] [--emulate bf16]
"""

from __future__ import annotations

import argparse
import sys

import torch

from lowbit import evaluate as E
from lowbit.nn import QuantLinear
from lowbit.testing import GPU_XQ_BLOCK, gpu_quantize_activations


def nf4_codebook_delta(qw) -> torch.Tensor:
    """float32 [N, K]: the weight as the integer kernels multiply an nf4 / fp4 one (codebook
    rounded to c / S, lowbit.formats.codebook_int_codes and CODE_SCALE) minus the weight as
    stored."""
    from lowbit import formats as F
    from lowbit import reference as R
    from lowbit.testing import codebook_absmax
    S = F.CODE_SCALE[qw.fmt]
    d = torch.tensor([i / S - v for i, v in zip(F.codebook_int_codes(qw.fmt), F.CODEBOOKS[qw.fmt])],
                     dtype=torch.float64)
    c = R.unpack_nibbles(qw.data, qw.shape[1]).long()
    return (d[c] * codebook_absmax(qw)).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="lowbit eval format specs (int4:g128, int8, ...)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--model", default=None)
    ap.add_argument("--emulate", choices=("idot", "bf16"), default="idot")
    a = ap.parse_args(argv)
    for text in a.specs:
        model, tok, _ = E.load_model(a.model, verbose=False)
        ids, _ = E.load_tokens(tok, a.tokens)
        E.apply_spec(model, E.parse_spec(text))
        with torch.no_grad():
            base = E.perplexity(model, ids, a.ctx, progress=False)["perplexity"]
            hooks = []
            for mod in model.modules():
                if not isinstance(mod, QuantLinear):
                    continue
                if a.emulate == "bf16":
                    def pre(m, args):
                        return (args[0].to(torch.bfloat16).to(args[0].dtype),) + tuple(args[1:])
                    hooks.append(mod.register_forward_pre_hook(pre))
                elif mod.qweight.fmt in GPU_XQ_BLOCK:
                    blk = GPU_XQ_BLOCK[mod.qweight.fmt]
                    seen = {}

                    def pre(m, args, blk=blk, seen=seen):
                        x = args[0]
                        xh, _, _ = gpu_quantize_activations(x.reshape(-1, x.shape[-1]), blk)
                        seen["x"] = xh.reshape(x.shape).to(x.dtype)
                        return (seen["x"],) + tuple(args[1:])
                    hooks.append(mod.register_forward_pre_hook(pre))
                    if mod.qweight.fmt == "nf4":  # and its codebook as 14-bit integers
                        dw = nf4_codebook_delta(mod.qweight)

                        def post(m, args, out, dw=dw, seen=seen):
                            return out + (seen["x"].float() @ dw.T).to(out.dtype)
                        hooks.append(mod.register_forward_hook(post))
            q = E.perplexity(model, ids, a.ctx, progress=False)["perplexity"]
        how = "rounded to bfloat16 (the CPU tile path)" if a.emulate == "bf16" else \
            "quantized as the integer-dot GEMV does"
        print(f"{text}: {base:.4f} exact, {q:.4f} with x {how} "
              f"({(q / base - 1) * 100:+.4f}%), {len(hooks)} layers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
