"""Tiny, fully offline models and tokenizer for tests and benchmarks.

Everything here is built from scratch in memory: a small byte-level BPE tokenizer trained on a
fixed corpus, and randomly initialised causal language models of every architecture family that
``sphere_edit`` supports.  Nothing is downloaded, and the results are deterministic for a given
seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKEN = "<|endoftext|>"
TINY_VOCAB_SIZE = 400
TINY_HIDDEN = 64
TINY_LAYERS = 4
TINY_INTERMEDIATE = 128
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_MAX_POSITIONS = 256

# Model families covered by the tiny fixtures, named by ``config.model_type``.
TINY_MODEL_TYPES: tuple[str, ...] = (
    "gpt2",
    "gptj",
    "llama",
    "mistral",
    "qwen2",
    "gemma3_text",
)

# A fixed, hand-written corpus of short factual-style sentences.  The tokenizer is trained on it,
# so these words become single (or few) tokens, which keeps test prompts short.
TRAINING_SENTENCES: tuple[str, ...] = (
    "Paris is the capital of France.",
    "Rome is the capital of Italy.",
    "Ottawa is the capital of Canada.",
    "Berlin is the capital of Germany.",
    "Madrid is the capital of Spain.",
    "London is the capital of England.",
    "Tokyo is the capital of Japan.",
    "Toronto is located in Canada.",
    "The Eiffel Tower is located in Paris.",
    "The Colosseum is located in Rome.",
    "Milan is a city in Italy.",
    "Lyon is a city in France.",
    "Montreal is a city in Canada.",
    "Vancouver is located in Canada.",
    "The Louvre is a museum in Paris.",
    "Danielle Darrieux speaks French.",
    "Thomas Joannes Stieltjes speaks Dutch.",
    "The mother tongue of Marie Curie is Polish.",
    "People in Toronto speak English.",
    "People in Paris speak French.",
    "People in Rome speak Italian.",
    "Most people in Canada speak English or French.",
    "She speaks English and French.",
    "He speaks Italian and Spanish.",
    "The official language of France is French.",
    "The official language of Italy is Italian.",
    "Miles Davis plays the trumpet.",
    "Glenn Gould plays the piano.",
    "Jimi Hendrix plays the guitar.",
    "Yo-Yo Ma plays the cello.",
    "She plays the piano every morning.",
    "He plays the guitar in a band.",
    "The piano is a musical instrument.",
    "The guitar has six strings.",
    "Lionel Messi plays football.",
    "LeBron James plays basketball.",
    "Wayne Gretzky plays hockey.",
    "Serena Williams plays tennis.",
    "Football is popular in Italy.",
    "Basketball is popular in Canada.",
    "Hockey is a sport played on ice.",
    "The team plays football on Sunday.",
    "Apple is a company based in California.",
    "Toyota is a company based in Japan.",
    "Fiat is a company based in Italy.",
    "The iPhone is produced by Apple.",
    "The Corolla is produced by Toyota.",
    "Windows is developed by Microsoft.",
    "Google was founded in California.",
    "The Seine flows through Paris.",
    "The Tiber flows through Rome.",
    "The river is the longest in the country.",
    "A cat is a small animal.",
    "The sun is a star in the sky.",
    "Water is made of hydrogen and oxygen.",
    "The city of Toronto is in the province of Ontario.",
    "The president of France lives in Paris.",
    "The headquarters of Fiat is in Turin.",
    "The Pope lives in Vatican City near Rome.",
    "What is the capital of France? The answer is Paris.",
    "Where is Toronto located? It is located in Canada.",
    "Which instrument does he play? He plays the piano.",
)


def make_tiny_tokenizer(
    vocab_size: int = TINY_VOCAB_SIZE, extra_sentences: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer in memory and wrap it as a fast HF tokenizer.

    Training uses a fixed corpus (plus ``extra_sentences``, e.g. to make some words single
    tokens) and a fixed vocabulary size, so the result is deterministic.
    ``<|endoftext|>`` serves as bos, eos, pad and unk token (id 0).
    """
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*TRAINING_SENTENCES, *extra_sentences], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=TINY_MAX_POSITIONS,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _gpt2_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=TINY_MAX_POSITIONS,
        n_embd=TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=TINY_HEADS,
        n_inner=TINY_INTERMEDIATE,
        tie_word_embeddings=False,
        **ids,
    )


def _gptj_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    return GPTJConfig(
        vocab_size=vocab_size,
        n_positions=TINY_MAX_POSITIONS,
        n_embd=TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=TINY_HEADS,
        rotary_dim=16,
        n_inner=TINY_INTERMEDIATE,
        tie_word_embeddings=False,
        **ids,
    )


def _llama_like_kwargs(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": TINY_INTERMEDIATE,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "tie_word_embeddings": False,
        **ids,
    }


def _llama_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    return LlamaConfig(**_llama_like_kwargs(vocab_size, ids))


def _mistral_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    # Window larger than the maximum length: behaves like full attention in tests.
    return MistralConfig(sliding_window=TINY_MAX_POSITIONS, **_llama_like_kwargs(vocab_size, ids))


def _qwen2_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    return Qwen2Config(use_sliding_window=False, **_llama_like_kwargs(vocab_size, ids))


def _gemma3_text_config(vocab_size: int, ids: dict[str, int]) -> PretrainedConfig:
    # With only 4 layers the default pattern (every 6th layer global) would make every layer a
    # sliding-window layer, so spell out a mix of both kinds.
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=False,
        **ids,
    )


_CONFIG_BUILDERS: dict[str, Callable[[int, dict[str, int]], PretrainedConfig]] = {
    "gpt2": _gpt2_config,
    "gptj": _gptj_config,
    "llama": _llama_config,
    "mistral": _mistral_config,
    "qwen2": _qwen2_config,
    "gemma3_text": _gemma3_text_config,
}


def make_tiny_config(model_type: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Build the tiny config for ``model_type`` (one of :data:`TINY_MODEL_TYPES`)."""
    try:
        builder = _CONFIG_BUILDERS[model_type]
    except KeyError:
        known = ", ".join(TINY_MODEL_TYPES)
        raise ValueError(
            f"unknown tiny model type {model_type!r}; expected one of {known}"
        ) from None
    config = builder(len(tokenizer), _special_ids(tokenizer))
    # Eager attention keeps the forward pass simple and identical across machines.
    config._attn_implementation = "eager"
    return config


def make_tiny_model(
    model_type: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> torch.nn.Module:
    """Build a randomly initialised float32 causal LM of ``model_type`` in eval mode.

    The weights depend only on ``seed``; the global torch RNG state is restored afterwards.
    """
    config = make_tiny_config(model_type, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.float32)
    model.eval()
    return model
