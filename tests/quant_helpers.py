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
