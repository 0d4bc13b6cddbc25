"""Tiny random-weight MoE models for tests, benchmarks and the set-up smoke run.

Each entry overrides a config's defaults so the model has hidden size 64, a few layers, 8 experts
and top-2 routing, builds in well under a second on a CPU and still uses the architecture's real
modules. Nothing here downloads anything: configs come from the installed transformers.

    python -m moescope.tiny qwen3_moe OUT_DIR     # save one as a checkpoint directory
"""

from __future__ import annotations

import re
import sys
from typing import Any

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MLA = dict(  # multi-head latent attention (DeepSeek-V2/V3 family)
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
)
GATED_DELTA = dict(  # hybrid linear attention (Qwen3-Next, Qwen3.5): 4 layers keep one full-attention layer
    num_hidden_layers=4, linear_num_value_heads=4, linear_num_key_heads=2,
    linear_key_head_dim=16, linear_value_head_dim=16,
)

# model_type -> overrides on top of COMMON. Expert counts use each config's own key name.
TINY: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(num_experts=8, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=8, norm_topk_prob=True),
    "qwen3_next": dict(num_experts=8, shared_expert_intermediate_size=32, **GATED_DELTA),
    "qwen3_5_moe_text": dict(num_experts=8, shared_expert_intermediate_size=32, **GATED_DELTA),
    "olmoe": dict(num_experts=8),
    "mixtral": dict(num_local_experts=8),
    "phimoe": dict(num_local_experts=8),
    "granitemoe": dict(num_local_experts=8),
    "granitemoeshared": dict(num_local_experts=8, shared_intermediate_size=32),
    "deepseek_v2": dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=2, topk_group=1, topk_method="group_limited_greedy", **MLA),
    "deepseek_v3": dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=2, topk_group=1, **MLA),
    "glm4_moe": dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "dots1": dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "gpt_oss": dict(num_local_experts=8, intermediate_size=32),
    "jamba": dict(num_experts=8, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32,
                        intermediate_size_mlp=64, interleave_moe_layer_step=1),
    "dbrx": dict(d_model=64, n_layers=2, n_heads=4,
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    "minimax": dict(num_local_experts=8),
    "hunyuan_v1_moe": dict(num_experts=8),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2),
    "exaone_moe": dict(num_experts=8),
    "afmoe": dict(num_experts=8, num_dense_layers=0, pad_token_id=0),
    "cohere2_moe": dict(num_experts=8),
    "glm4_moe_lite": dict(n_routed_experts=8, first_k_dense_replace=1, n_group=1, topk_group=1, **MLA),
    "granitemoe_swa": dict(num_local_experts=8),
    "hy_v3": dict(num_experts=8),
    "kolibri1": dict(num_local_experts=8, shared_expert_intermediate_size=32),
    "laguna": dict(num_experts=8),
    "lara_mini": dict(num_experts=8),
    "mellum": dict(num_experts=8),
    "mimo_v2_flash": dict(n_routed_experts=8),
    "minimax_m2": dict(num_local_experts=8),
    "solar_open": dict(n_routed_experts=8, n_group=1, topk_group=1),
    "zaya": dict(num_experts=8, num_experts_per_tok=1),
    "deepseek_v4": dict(n_routed_experts=8),
}


def tiny_config(model_type: str, **overrides: Any):
    """A small config of `model_type` from the installed transformers (no download)."""
    from transformers import AutoConfig

    if model_type not in TINY:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY))}")
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type], **overrides})
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides: Any):
    """A tiny random-weight causal LM of `model_type`, in eval mode."""
    return random_model(tiny_config(model_type, **overrides), seed)


def random_model(config, seed: int = 0, device=None, dtype=None):
    """A random-weight causal LM built from `config`, in eval mode, its weights made on `device` (e.g.
    "cuda": no host copy of a 30B model) at `dtype`, and its routers given real values."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves routers (and DeepSeek-style correction biases) at zero; give them real values.
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, tensor in tensors:
            routing = re.search(r"router|gate|correction_bias|expert_bias", name)
            if routing and tensor.is_floating_point() and not tensor.any():
                tensor.normal_(0, 0.5)
    return model.eval()


def save_tiny_model(model_type: str, out_dir: str, seed: int = 0) -> None:
    """Write a tiny model as a safetensors checkpoint directory."""
    tiny_model(model_type, seed).save_pretrained(out_dir)


if __name__ == "__main__":
    save_tiny_model(sys.argv[1], sys.argv[2])
