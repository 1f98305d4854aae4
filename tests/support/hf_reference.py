"""Hugging Face reference models for parity tests (torch + transformers, tests only)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert import mapping

TINY_HF = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
               rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}


def hf_model(hf_config: dict, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-init float32 HF model for `hf_config` (a config.json dict, Hub dialect or transformers 5)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # Norm weights start at 1; randomise them so that a swapped norm would show.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def params_for(model, config: ModelConfig) -> dict:
    """Our params from an HF model through the conversion table (in memory)."""
    return mapping.params_from_hf(state_dict_numpy(model).__getitem__, config)


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()
