"""Tiny random-weight models of every supported family, built in memory (no download), and a tiny
byte-level BPE tokenizer trained on the fly. Float64 by default so identities hold to ~1e-12."""
from __future__ import annotations

import functools

import torch

CORPUS = [
    "I like Italy and France. I visited the city of Florence and Paris.",
    "The capital of Japan is the city of Tokyo. The capital of France is Paris.",
    "Obama grew up in Hawaii. Lionel Messi plays for Paris.",
    "Q: hot A: cold Q: big A: small Q: up A: down",
] * 4

FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "gpt_neox_seq")


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def config(family: str):
    import transformers as tf

    v = tokenizer().vocab_size
    common = dict(vocab_size=v, bos_token_id=0, eos_token_id=0, max_position_embeddings=64, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, initializer_range=0.15)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=v, n_positions=64, n_embd=32, bos_token_id=0, eos_token_id=0, n_layer=3, n_head=4, initializer_range=0.15,
                             scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":
        return tf.LlamaConfig(**common, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=True)
    if family in ("gpt_neox", "gpt_neox_seq"):
        return tf.GPTNeoXConfig(**common, intermediate_size=64, use_parallel_residual=(family == "gpt_neox"),
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5},
                                hidden_dropout=0.0, attention_dropout=0.0)
    raise KeyError(family)


def build(family: str, dtype=torch.float64, seed: int = 0):
    """A tiny random model of `family` in eval mode, norms with non-trivial weights and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or name.startswith("ln"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
