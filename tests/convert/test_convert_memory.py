"""Conversion memory: the README's "peak memory stays near our largest parameter", measured in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert import mapping
from hephaestus_jax.convert.orbax_to_hf import BLOCK_BYTES
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

MIB = 2**20
# float32: the embedding and the output matrix are the largest parameters (64 MiB each); 24 layers of 10 MiB
# make the whole model 368 MiB, more than any bound below.
MODEL = ModelConfig(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_layers=24, num_heads=8,
                    num_kv_heads=8, max_position_embeddings=64)
# Orbax/TensorStore/allocator overhead on top of the data. Measured: import 11 MiB; export 10-67 MiB (it varies
# from run to run with the read that overlaps the write in flight).
IMPORT_SLACK, EXPORT_SLACK = 32 * MIB, 112 * MIB

# The peak is the growth of the resident set over the process's state after its imports: VmHWM is reset to the
# current RSS first (clear_refs 5), so the interpreter and jax do not count, only the conversion.
_CHILD = """
import json, re, sys
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = kib("VmRSS")
convert = convert_hf_to_orbax if sys.argv[1] == "import" else convert_orbax_to_hf
convert(sys.argv[2], sys.argv[3])
print(json.dumps({"growth": (kib("VmHWM") - start) * 1024}))
"""


def _peak_growth(direction: str, source: str, dest: str) -> int:
    result = subprocess.run([sys.executable, "-c", _CHILD, direction, source, dest], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the peak RSS from Linux's /proc")
def test_conversion_peak_memory_stays_near_the_largest_parameter(tmp_path):
    sizes = [4 * entry.hf_size * len(entry.hf_names) for entry in mapping.entries(MODEL)]
    largest, total = max(sizes), sum(sizes)
    assert largest == 64 * MIB and total > largest + 2 * BLOCK_BYTES + EXPORT_SLACK + 48 * MIB
    write_random_hf_checkpoint(MODEL, str(tmp_path / "hf"))
    # Import holds one parameter at a time, assembled in one buffer.
    imported = _peak_growth("import", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert imported <= largest + IMPORT_SLACK, imported / MIB
    # Export streams each parameter through two reused blocks, with a read cache of at most one parameter.
    exported = _peak_growth("export", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert exported <= largest + 2 * BLOCK_BYTES + EXPORT_SLACK, exported / MIB
