"""The remat x micro-batch search of tools/aot_compile.py --search: candidates, pruning, the selection rule
(fake compile results), and one real search of a tiny model for a TPU topology."""

import types

import gin
import pytest

from support.cli_helpers import load_tool
from conftest import REPO_ROOT
from hephaestus_jax import aot, aot_search, gin_configs, recipe
from hephaestus_jax.aot_search import Candidate, Outcome
from hephaestus_jax.config import REMAT_POLICY_NAMES, ConfigError, DataConfig, MeshConfig, ModelConfig, \
    OptimizerConfig, TrainConfig


def measured(policy: str, accum: int, step: float, headroom: float, compute: float | None = None) -> Outcome:
    """A compiled outcome with the numbers the search reads from a StepReport."""
    report = types.SimpleNamespace(step_seconds=step, compute_seconds=step if compute is None else compute,
                                   headroom=headroom, fits=headroom >= 0)
    return Outcome(Candidate(policy, accum), report=report)


def test_remat_order_lists_every_policy_once():
    assert sorted(aot_search.REMAT_ORDER) == sorted(REMAT_POLICY_NAMES)


def test_candidates_split_the_batch_evenly_smallest_programs_first():
    todo = aot_search.candidates(512, 16, ("dots_no_batch", "full"))
    # Micro-batches of 16, 32, ..., 512 rows over 16 shards; most micro-batches first, policies in REMAT_ORDER.
    assert todo[:3] == [Candidate("full", 32), Candidate("dots_no_batch", 32), Candidate("full", 16)]
    assert sorted({c.grad_accum_steps for c in todo}) == [1, 2, 4, 8, 16, 32] and len(todo) == 12
    assert {c.grad_accum_steps for c in aot_search.candidates(512, 32)} == {1, 2, 4, 8, 16}  # 16 rows < 32 shards.
    assert aot_search.candidates(512, 16, ("none",), [8, 16]) == [Candidate("none", 16), Candidate("none", 8)]
    assert Candidate("qkv_out", 8).bindings() == ["ModelConfig.remat_policy = 'qkv_out'",
                                                  "TrainConfig.grad_accum_steps = 8"]


@pytest.mark.parametrize("policies, counts, message", [
    (("fulll",), None, r"remat policies \['fulll'\]: expected some of"),
    ((), None, "remat policies"),
    (("full",), [16, 64], r"with batch_size 512 over 16 data x fsdp shards, the micro-batch counts are \[1, 2, 4"),
    (("full",), [3], "grad_accum_steps"),
])
def test_bad_candidate_lists_fail_clearly(policies, counts, message):
    with pytest.raises(ConfigError, match=message):
        aot_search.candidates(512, 16, policies, counts)


def test_choose_the_fastest_step_with_the_headroom():
    outcomes = [measured("none", 16, step=30.0, headroom=0.10),  # Fastest, but under 20% headroom.
                measured("dots", 16, step=33.0, headroom=0.30),
                measured("full", 16, step=39.0, headroom=0.70),
                Outcome(Candidate("dots", 8), refused="ran out of HBM"),
                Outcome(Candidate("qkv_out", 8), skipped="over the budget")]
    assert aot_search.choose(outcomes).candidate == Candidate("dots", 16)
    assert aot_search.choose(outcomes, min_headroom=0.05).candidate == Candidate("none", 16)
    assert aot_search.choose(outcomes, min_headroom=0.8) is None
    assert aot_search.choose([]) is None


def test_steps_within_one_percent_tie_and_go_to_fewer_micro_batches_then_more_headroom():
    fast = measured("dots", 16, step=33.0, headroom=0.30)
    fewer = measured("dots", 8, step=33.2, headroom=0.22)  # 0.6% slower: a tie.
    assert aot_search.choose([fast, fewer]) is fewer
    assert aot_search.choose([fast, measured("dots", 8, step=33.5, headroom=0.22)]) is fast  # 1.5%: no tie.
    roomier = measured("qkv_out", 16, step=33.1, headroom=0.40)
    assert aot_search.choose([fast, roomier]) is roomier


def test_a_candidate_too_big_prunes_those_saving_as_much_with_no_more_micro_batches():
    done = [measured("qkv_out", 16, step=35.0, headroom=0.15)]
    for bigger in (Candidate("qkv_out", 8), Candidate("dots", 16), Candidate("none", 4)):
        assert "did not fit" in aot_search.skip_reason(bigger, done)
    for other in (Candidate("full", 16), Candidate("full", 8), Candidate("dots", 32), Candidate("qkv_out", 32)):
        assert aot_search.skip_reason(other, done) is None
    refused = [Outcome(Candidate("dots", 32), refused="ran out of HBM")]
    assert aot_search.skip_reason(Candidate("none", 16), refused) is not None
    assert aot_search.skip_reason(Candidate("dots_no_batch", 16), refused) is None
    assert aot_search.skip_reason(Candidate("qkv_out", 8), done, min_headroom=0.1) is None


def test_a_policy_whose_compute_is_slower_than_the_best_step_is_not_compiled_again():
    done = [measured("full", 32, step=40.0, headroom=0.6, compute=39.0),
            measured("dots_no_batch", 32, step=34.0, headroom=0.3, compute=33.0)]
    assert "slower than the best step (34 s)" in aot_search.skip_reason(Candidate("full", 16), done)
    assert aot_search.skip_reason(Candidate("dots_no_batch", 16), done) is None  # HBM-bound: fewer may be faster.
    near = [measured("full", 32, step=34.2, headroom=0.6), done[1]]  # Within the tie: may still win.
    assert aot_search.skip_reason(Candidate("full", 16), near) is None


def test_search_compiles_only_the_candidates_that_can_win():
    results = {  # What each candidate compiles to; refused ones raise as the TPU compiler's refusal does.
        Candidate("full", 4): measured("full", 4, step=40.0, headroom=0.6, compute=39.0).report,
        Candidate("dots_no_batch", 4): measured("dots_no_batch", 4, step=34.0, headroom=0.4, compute=31.0).report,
        Candidate("dots_no_batch", 2): measured("dots_no_batch", 2, step=32.0, headroom=0.15, compute=31.0).report,
    }
    compiled = []

    def compile_step(configs, topology):
        candidate = Candidate(configs.model.remat_policy, configs.train.grad_accum_steps)
        compiled.append(candidate)
        if candidate not in results:
            raise aot.DoesNotFit("v5p-32: the TPU compiler ran out of HBM: RESOURCE_EXHAUSTED")
        return results[candidate]

    configs = _configs()
    todo = aot_search.candidates(8, 2, ("full", "dots_no_batch", "none"))
    outcomes = aot_search.search(configs, None, todo, compile_step=compile_step)
    assert compiled == [Candidate("full", 4), Candidate("dots_no_batch", 4), Candidate("none", 4),
                        Candidate("dots_no_batch", 2)]
    assert [o.candidate for o in outcomes] == todo
    skipped = {o.candidate: o.skipped for o in outcomes if o.skipped}
    assert "slower than the best step" in skipped[Candidate("full", 2)]
    assert "memory of none x 4" in skipped[Candidate("none", 1)]
    assert "memory of dots_no_batch x 2" in skipped[Candidate("dots_no_batch", 1)]
    assert "RESOURCE_EXHAUSTED" in next(o.refused for o in outcomes if o.candidate == Candidate("none", 4))
    assert aot_search.choose(outcomes).candidate == Candidate("dots_no_batch", 4)

    compiled.clear()
    budget = aot_search.search(configs, None, todo, max_compiles=1, compile_step=compile_step)
    assert compiled == [Candidate("full", 4)]
    assert all("budget of 1 compiles" in o.skipped for o in budget[1:])


def _configs() -> gin_configs.Configs:
    """A stage configuration (only the fields the search replaces matter to the fake compiler)."""
    return gin_configs.Configs(ModelConfig(), MeshConfig(), OptimizerConfig(), DataConfig(),
                               TrainConfig(output_dir="unused", batch_size=8))


# The quickstart model with a small vocabulary (so the layers, which remat recomputes, are most of the work).
TINY = ("ModelConfig.vocab_size = 2048", "ModelConfig.hidden_size = 256", "ModelConfig.intermediate_size = 512",
        "ModelConfig.head_dim = 64", "TrainConfig.batch_size = 8")


@pytest.mark.slow  # Two TPU compiles: 36-82 s on the 2 shared cores under load (like tests/test_aot.py's).
def test_search_of_a_tiny_model_compiles_for_a_tpu_topology_and_prints_the_winner(monkeypatch, capsys):
    pytest.importorskip("libtpu", reason="the [tpu] extra (libtpu) describes TPU topologies")
    monkeypatch.chdir(REPO_ROOT)
    try:
        returncode = load_tool("aot_compile").main([
            "--gin_file", "configs/quickstart.gin", "--topology", "v5p-8", "--search", "--remat", "none,full",
            "--grad_accum", "2", *(arg for binding in TINY for arg in ("--gin_param", binding))])
    finally:
        gin.clear_config()
    out, err = capsys.readouterr()
    assert returncode == 0, err[-3000:]
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][:3] == ["remat", "micro-batches", "rows per micro-batch per data x fsdp shard"]
    # 8 rows over 4 chips in 2 micro-batches: 1 row per chip at a time; full first (it keeps less).
    assert [row[:3] for row in rows[1:]] == [["full", "2", "1"], ["none", "2", "1"]]
    full, none = rows[1], rows[2]
    assert {full[10], none[10]} <= {"fits", "**chosen**"} and "2 candidates, batch 8 over 4" in err
    assert float(full[5]) > 1.1 * float(none[5])  # Compute seconds: full remat runs the forward pass twice.
    chosen = [row for row in rows if row[10] == "**chosen**"]
    assert len(chosen) == 1 and f"ModelConfig.remat_policy = '{chosen[0][0]}'" in out
    assert f"TrainConfig.grad_accum_steps = {chosen[0][1]}" in out


# ------------------------------------------------------------------------------------ the shipped TPU configurations
TPU_MESHES = {"v5p_32": "llama3_8b", "v5p_32x2": "llama3_8b", "v5e_256": "llama3_8b", "v4_128": "llama3_8b",
              "v5p_128": "llama3_70b"}
SEARCHED_REMAT = {"v5p_32": "dots_no_batch", "v5p_128": "qkv_out"}  # docs/tpu_memory.md; the others: stage I's.
SEARCHED_GRAD_ACCUM = {"v5e_256": 2}  # docs/tpu_memory.md; the others: each stage's own.


def _configs_of(files: list[str], params: list[str] = ()):
    try:
        gin_configs.load_gin(files, list(params))
        return gin_configs.build_configs()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("mesh", sorted(TPU_MESHES))
def test_shipped_tpu_meshes_use_splash_attention(mesh, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    configs = _configs_of(["configs/stage1_cpt.gin", f"configs/model/{TPU_MESHES[mesh]}.gin",
                           f"configs/mesh/{mesh}.gin"])
    assert (configs.model.attention_impl, configs.model.remat_policy) == ("splash", SEARCHED_REMAT.get(mesh, "full"))
    assert configs.train.grad_accum_steps == SEARCHED_GRAD_ACCUM.get(mesh, 16)
    chips = {"v5p_32": 16, "v5p_32x2": 32, "v5e_256": 256, "v4_128": 64, "v5p_128": 64}[mesh]
    data, fsdp, _ = configs.mesh.ici_shape(chips // configs.mesh.num_slices)
    batch_shards = data * fsdp * configs.mesh.dcn_data
    for stage in ("stage1_cpt", "stage2_cpt", "sft"):  # Every stage's micro-batch covers the batch shards.
        train = _configs_of([f"configs/{stage}.gin", f"configs/model/{TPU_MESHES[mesh]}.gin",
                             f"configs/mesh/{mesh}.gin"]).train
        assert train.batch_size // train.grad_accum_steps % batch_shards == 0, (stage, train)
    assert _configs_of(["configs/quickstart.gin"]).model.attention_impl == "xla"  # CPU runs: no TPU kernel.


def test_the_tpu_mixture_study_uses_splash_attention(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    try:
        gin_configs.load_gin(["configs/mixture_study/llama3_8b_v5p.gin"], [])
        assert ModelConfig().attention_impl == "splash"
    finally:
        gin.clear_config()


def test_every_stage_of_the_tpu_recipe_keeps_the_mesh_files_settings(monkeypatch):
    """stage2_cpt.gin and sft.gin include stage1_cpt.gin; the mesh file must still have the last word."""
    monkeypatch.chdir(REPO_ROOT)
    mesh = _configs_of(["configs/stage1_cpt.gin", "configs/model/llama3_8b.gin", "configs/mesh/v5p_32.gin"])
    try:
        gin_configs.load_gin(["configs/recipe/llama3_8b_v5p.gin"], [])
        stages = recipe.Recipe()
    finally:
        gin.clear_config()
    seen = []
    for stage in recipe.STAGES:
        arguments = stages.stage_arguments(stage)
        files = [arguments[i + 1] for i in range(0, len(arguments), 2) if arguments[i] == "--gin_file"]
        params = [arguments[i + 1] for i in range(0, len(arguments), 2) if arguments[i] == "--gin_param"]
        configs = _configs_of(files, params)
        assert (configs.model.attention_impl, configs.model.remat_policy) == \
            (mesh.model.attention_impl, mesh.model.remat_policy), stage
        seen.append((configs.data.mixture, configs.train.batch_size, configs.train.grad_accum_steps))
    assert seen == [("forge_stage1", 512, 16), ("forge_stage2", 512, 16), ("forge_sft", 64, 2)]
