"""Tiny Hugging Face transformers built from configs in code (random weights, nothing downloaded).

Each factory returns the model as Hugging Face builds it: ``forward`` takes
one tensor (``input_ids`` or ``pixel_values``) and returns a ``ModelOutput``;
ndc compiles its ``logits`` (``ndc partition --output`` chooses another).

    ndc partition examples/transformers_models.py:bert --input-shape 1,16
    ndc partition examples/transformers_models.py:vit
    ndc partition examples/transformers_models.py:llama --input-shape 1,16

Sizes: hidden 32, 2 layers, 4 heads (Llama: 2 key/value heads, grouped-query
attention), vocabulary 100, MLP 64: each model traces in about a second.
"""

from __future__ import annotations


def bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def vit(image_size: int = 16, channels: int = 3, num_labels: int = 5):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=channels, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def fashion_vit():
    """A small ViT for 1x28x28 Fashion-MNIST (the benchmark's teacher architecture): 4 layers, hidden 64, patches of 7."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    return ViTForImageClassification(config)
