"""Tiny randomly initialised causal LMs of every supported family, for fast CPU tests.

Each covers a different corner: GQA and MHA, head_dim 64/80/96/128/256, partial and interleaved
rotary embeddings, sliding-window layers, logit soft-capping, q/k norms.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96


def _common(**kw):
    base = dict(vocab_size=VOCAB, max_position_embeddings=2048, attention_dropout=0.0)
    base.update(kw)
    return base


FAMILIES = {
    # name: (config class, kwargs); head_dim noted in the comment
    "llama": (
        tf.LlamaConfig,
        _common(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
    ),  # GQA, hd 64
    "mistral": (
        tf.MistralConfig,
        _common(
            hidden_size=256,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=128,
            sliding_window=48,
        ),
    ),  # MQA, hd 128, sliding window
    "qwen2": (
        tf.Qwen2Config,
        _common(
            hidden_size=160, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
        ),
    ),  # MHA, hd 80, q/k/v bias
    "qwen3": (
        tf.Qwen3Config,
        _common(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,
        ),
    ),  # q/k norm
    "phi3": (
        tf.Phi3Config,
        _common(
            hidden_size=192,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            pad_token_id=0,
        ),
    ),  # hd 96, partial rotary
    "gemma2": (
        tf.Gemma2Config,
        _common(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=40,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),  # hd 256, softcap, sliding + global
    "gemma3": (
        tf.Gemma3TextConfig,
        _common(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            sliding_window=40,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        _common(hidden_size=160, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, rotary_pct=0.25),
    ),  # MHA, hd 80, partial rotary
    "gptj": (
        tf.GPTJConfig,
        dict(
            vocab_size=VOCAB,
            n_positions=2048,
            n_embd=128,
            n_layer=2,
            n_head=2,
            rotary_dim=32,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),  # interleaved
}


def make_tiny(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised model of ``family`` in eval mode."""
    cls, kw = FAMILIES[family]
    config = cls(**kw)
    torch.manual_seed(seed)
    # Gemma-2 soft-caps attention logits, which only eager attention does (transformers 5.2 picks
    # SDPA by default and silently skips the soft-cap).
    attn = "eager" if family == "gemma2" else None
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    # Larger than default init so attention is not uniform and eviction matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "query_key_value", "qkv")) and p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def family_supported(family: str) -> bool:
    """Whether this transformers version routes the family's attention through AttentionInterface
    (GPT-J does only from transformers 5.18 or so; nexusquant refuses it before)."""
    import nexusquant as nq
    from nexusquant.architecture import check_supported

    try:
        check_supported(make_tiny(family))
        return True
    except nq.NexusQuantError:
        return False
