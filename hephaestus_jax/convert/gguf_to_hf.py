"""A Hugging Face checkpoint (safetensors + config + tokenizer files) from a Llama-architecture GGUF file.

The weights go through transformers (`from_pretrained(gguf_file=...)` dequantizes them; needs the `gguf`
package), saved as float32 or bfloat16 safetensors. The tokenizer files are rebuilt from the GGUF metadata
(`gguf_tokenizer`), since the tokenizer.json transformers 5.3 saves for a GGUF model does not reload correctly.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from hephaestus_jax.convert.gguf_tokenizer import GGUFError, tokenizer_files, write_tokenizer_files

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_QUANTIZATIONS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                           "Q5_K", "Q6_K")
"""GGML tensor types transformers dequantizes (through gguf-py) and that are checked here; others are refused."""
GGUF_FLOAT32_FIELDS = ("rms_norm_eps", "rope_theta")
"""config.json fields written as the shortest decimal of their float32 GGUF value, as the published configs have
them (so `configs/model/smollm2_135m.gin` matches the converted checkpoint)."""


def check_gguf(gguf_path: str) -> Any:
    """GGUFError naming the file and the field when the GGUF is not a Llama model in a supported tensor type;
    else its `gguf.GGUFReader` (reading the metadata of a 49K-token vocabulary takes seconds: read it once)."""
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
    except ValueError as e:  # Not a GGUF file (its magic or version), or cut short.
        raise GGUFError(f"{gguf_path}: not a readable GGUF file: {e}") from None
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{gguf_path}: general.architecture is {architecture!r}; only {SUPPORTED_ARCHITECTURES} "
                         "(the Llama architecture) is supported")
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_QUANTIZATIONS:
            raise GGUFError(f"{gguf_path}: tensor {tensor.name} has the unsupported quantization "
                             f"{tensor.tensor_type.name} (supported: {', '.join(SUPPORTED_QUANTIZATIONS)})")
    return reader


def gguf_to_hf(gguf_path: str, output_dir: str, dtype: str = "float32") -> None:
    """Write `output_dir` (config.json, model.safetensors, tokenizer files) from the GGUF at `gguf_path`."""
    import torch
    import transformers

    reader = check_gguf(gguf_path)
    tokenizer = tokenizer_files(reader, gguf_path)  # Its errors come before anything is written.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=getattr(torch, dtype),
                                                              local_files_only=True)
    for field in GGUF_FLOAT32_FIELDS:  # GGUF stores them as float32: 1e-5 arrives as 9.999999747378752e-06.
        if isinstance(getattr(model.config, field, None), float):
            setattr(model.config, field, float(str(np.float32(getattr(model.config, field)))))
    model.save_pretrained(output_dir)
    write_tokenizer_files(tokenizer, output_dir)
    log.info("wrote %s from %s", output_dir, gguf_path)
