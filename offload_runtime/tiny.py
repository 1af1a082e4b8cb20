"""Tiny models built from configs in code, for tests, benchmarks and examples (no hub access).

Each builder returns a randomly initialised model in eval mode with a fixed seed, small enough to run a
forward pass in milliseconds on a CPU yet with several decoder blocks so streaming has something to do.

Mixtures of experts (:data:`TINY_MOE_ARCHITECTURES`, kept apart so tests parametrised over
:data:`TINY_ARCHITECTURES` do not grow) have hidden size 64, 4 to 8 experts, top-2 to top-4 routing, and
each one the feature that makes it different: a shared expert (Qwen2-MoE), dense first layers, shared and
routed experts and grouped top-k (DeepSeek-V3), expert biases, attention sinks and sliding-window layers
(gpt-oss). Only config fields that exist in transformers 5.17 (the GPU machine's) and 5.24 are set.
"""

from __future__ import annotations

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert")
TINY_MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe")

# fields every tiny MoE shares; token ids inside the vocabulary (some configs default to ids > 256)
_MOE_COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# per architecture: config class, then its own fields (expert MLP width, experts, top-k, specialities)
_MOE_FIELDS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "head_dim": 16,
            "norm_topk_prob": True,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "num_key_value_heads": 4,
            "intermediate_size": 128,  # the dense first layer's MLP
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 3,
            "n_group": 4,  # grouped top-k: the best 2 of 4 groups of 2 experts, then the top 3 among them
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "sliding_window": 4,  # shorter than test prompts: the sliding layers really slide
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2}),
}


def tiny_config(arch: str, *, num_layers: int = 3, **overrides):
    """The config of a tiny model of architecture ``arch`` (one of :data:`TINY_ARCHITECTURES` or
    :data:`TINY_MOE_ARCHITECTURES`)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=num_layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=1,
        )
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    elif arch in _MOE_FIELDS:
        import transformers

        class_name, fields = _MOE_FIELDS[arch]
        cfg = getattr(transformers, class_name)(**{**_MOE_COMMON, **fields, "num_hidden_layers": num_layers})
    else:
        known = TINY_ARCHITECTURES + TINY_MOE_ARCHITECTURES
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {known}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    arch: str, *, num_layers: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
):
    """A tiny randomly initialised model of architecture ``arch``, in eval mode.

    Args:
        arch (`str`): ``"llama"``, ``"qwen2"``, ``"gpt2"`` (causal LMs), ``"bert"`` (an encoder), or a
            mixture of experts of :data:`TINY_MOE_ARCHITECTURES` (causal LMs).
        num_layers (`int`, defaults to 3): number of transformer blocks.
        dtype (`torch.dtype`, defaults to `torch.float32`): parameter dtype.
        seed (`int`, defaults to 0): seed for the random weights.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(arch, num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    factory = AutoModel if arch == "bert" else AutoModelForCausalLM
    # built in ``dtype`` like from_pretrained does, not cast after: a cast would also turn fp32 buffers
    # (rotary inv_freq) into ``dtype``, unlike the same model loaded from a checkpoint
    model = factory.from_config(cfg, dtype=dtype)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 256):
    """A word-level tokenizer for the tiny models (no hub access): words ``w0``, ``w1``, ... and ``<eos>``.

    Text of other words maps to ``<unk>``; enough to exercise tokenizer round trips and generation.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
