"""Hooks: SIGTERM during evaluation stops it between batches and the run then saves; the metrics writer."""

import os
import signal
import time

from hephaestus_jax import hooks
from hephaestus_jax.metrics import MetricsWriter, best_seconds, read_metrics, training_flops_per_token
from hephaestus_jax.config import ModelConfig


def test_sigterm_during_evaluation_stops_it_between_batches():
    watcher = hooks.PreemptionWatcher()
    seen = []

    def batches():
        for i in range(100):
            if i == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # The notice arrives while batch 3 is being read.
            yield i

    for batch in hooks.until(watcher.requested, batches()):
        seen.append(batch)
    assert seen == [0, 1, 2]  # Batch 3 was fetched after the notice, so it is not evaluated.
    assert watcher.should_stop(step=10)  # The loop then saves this step and exits.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_metrics_writer_drops_steps_that_a_resume_recomputes(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=10, start_step=0, enabled=True)
    for step in range(1, 7):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = MetricsWriter(str(tmp_path), total_steps=10, start_step=4, enabled=True)
    resumed.write(5, {"loss": 50.0})
    resumed.close()
    assert [(e["step"], e["loss"]) for e in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]


def test_training_flops_follow_the_6n_rule_plus_attention():
    config = ModelConfig()  # Llama-3-8B shapes.
    matmul_params = config.num_params() - config.vocab_size * config.hidden_size - \
        (2 * config.num_layers + 1) * config.hidden_size  # Minus the embedding lookup and the norm scales.
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * 8192
    assert training_flops_per_token(config, 8192) == 6 * matmul_params + attention


def test_best_seconds_is_the_fastest_timed_call_after_an_untimed_one():
    durations, calls = [0.3, 0.06, 0.02, 0.04], []

    def work(scale):
        calls.append(scale)
        time.sleep(durations[len(calls) - 1] * scale)
        return scale

    best = best_seconds(work, 1.0, repeats=3)
    assert len(calls) == 4 and 0.02 <= best < 0.04  # The 0.3 s first call (compiling) is not timed.
