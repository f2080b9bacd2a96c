"""Shared pieces of the whole-model quantization tests: a tiny random Llama and calibration."""

import torch


def tiny_llama(layers: int = 2, hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2,
               vocab: int = 96, seed: int = 0, tie: bool = False):
    """A random LlamaForCausalLM (GQA when kv_heads < heads) in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives tiny weights and near-uniform predictions; widen the norms a little so
    # activations vary per channel, as in trained models.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.exp(0.5 * torch.randn_like(p)))
    return model


def token_batches(vocab: int = 96, n: int = 4, batch: int = 2, seq: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def fold_random_scales(model, blocks, ids, seed: int = 0):
    """Give every AWQ group of every block a random scale and apply it as AWQ does (fold into
    the producer where the block's float output allows it, the block check included); groups
    left for input_scale are unscaled again, so the model should compute what it did. Returns
    {group's linear names: the producer it folded into, or None}."""
    from torch import nn

    from lowbit.quantize import awq as A
    from lowbit.quantize import blocks as B
    calls = B.capture_block_inputs(model, blocks, [{"input_ids": ids}])
    inputs = calls.first
    g = torch.Generator().manual_seed(seed)
    folded = {}
    for bi, block in enumerate(blocks):
        inputs = calls.inputs_for(bi, inputs)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        groups = A._probe_groups(block, inputs[0], linears)
        A._collect(block, inputs, groups, 0, False)
        for grp in groups:
            mods = {r: (linears[r], None) for r in grp.names}
            grp.scale = torch.exp(torch.randn(linears[grp.names[0]].in_features, generator=g))
            A._apply_scale(block, grp, mods, True, inputs[0])
            folded[tuple(grp.names)] = grp.producer[1] if grp.folded else None
            if not grp.folded:  # the layer would keep input_scale: undo for the float check
                for r in grp.names:
                    linears[r].weight.div_(grp.scale)
        inputs = B.run_block(block, inputs)
    return folded
