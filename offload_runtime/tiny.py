"""Tiny models built from configs in code, for tests, benchmarks and examples (no hub access).

Each builder returns a randomly initialised model in eval mode with a fixed seed, small enough to run a
forward pass in milliseconds on a CPU yet with several decoder blocks so streaming has something to do.
"""

from __future__ import annotations

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert")


def tiny_config(arch: str, *, num_layers: int = 3, **overrides):
    """The config of a tiny model of architecture ``arch`` (one of :data:`TINY_ARCHITECTURES`)."""
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
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    arch: str, *, num_layers: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
):
    """A tiny randomly initialised model of architecture ``arch``, in eval mode.

    Args:
        arch (`str`): ``"llama"``, ``"qwen2"``, ``"gpt2"`` (causal LMs) or ``"bert"`` (an encoder).
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
