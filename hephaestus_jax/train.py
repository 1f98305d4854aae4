"""Train a Llama-3-family model on a Forge task or mixture (CPT or SFT), sharded over a device mesh.

    python -m hephaestus_jax.train --gin_file configs/quickstart.gin [--gin_file ...] [--gin_param 'B.x=1' ...]

Gin binds the configuration dataclasses (ModelConfig, MeshConfig, OptimizerConfig, DataConfig with its
ForgeFiles and per-stage mixture_rates, TrainConfig). Every mistake that can be found
before compiling is (files, bindings, mesh, shapes). The run writes under TrainConfig.output_dir:
config.gin, checkpoints/, metrics.jsonl, tensorboard/, and the Hugging Face export if asked for.
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import logging
import os
import sys
import time
from typing import Any

import gin
import jax
from etils import epath

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import distributed, gin_configs, hooks, sharding
from hephaestus_jax.train_checkpointer import TrainCheckpointer
from hephaestus_jax.gin_configs import Configs
from hephaestus_jax.config import ConfigError, DataConfig, ModelConfig, TrainConfig, check_no_placeholders
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax, read_hf_config
from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf
from hephaestus_jax.eval import function_calling, heldout
from hephaestus_jax.metrics import MetricsWriter, peak_flops_total, training_flops_per_token
from hephaestus_jax.train_step import TrainStep

log = logging.getLogger("hephaestus_jax.train")


def run(configs: Configs) -> int:
    """Train until TrainConfig.num_steps (or a preemption request); returns the last step reached."""
    from hephaestus_jax.data import mixtures  # lazy: TensorFlow; bad flags do not need it.

    check_no_placeholders(configs.data, configs.train)
    if configs.train.function_calling_eval:
        command.require("bfcl")  # BFCL's own checker scores the in-loop evaluation.
    distributed.preflight()
    mesh = sharding.make_mesh(configs.mesh)
    configured = configs.model  # What the checkpoints record; `model` is what computes on this mesh.
    model, train, data = sharding.model_for_mesh(configured, mesh), configs.train, configs.data
    sharding.check_model_fits(model, mesh)
    sharding.check_batch_fits(train.batch_size // train.grad_accum_steps, mesh,
                              "TrainConfig.batch_size / grad_accum_steps")
    renderer = mixtures.renderer_of(data)  # The tokenizer and chat format, resolved once for the whole run.
    if renderer.vocab.vocab_size > model.vocab_size:
        raise ConfigError(f"the tokenizer has {renderer.vocab.vocab_size} tokens but ModelConfig.vocab_size is "
                          f"{model.vocab_size}")
    _check_init(train, model)
    spec = StreamSpec(global_rows=train.batch_size, seq_len=data.seq_len, seed=data.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(), prefetch=data.prefetch,
                      num_threads=data.num_threads)
    stream = mixtures.train_stream(data, spec, renderer=renderer)  # Checks prepared shards against the renderer.
    primary = jax.process_index() == 0
    if primary:
        output = epath.Path(train.output_dir)  # Local or gs://.
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.gin").write_text(gin.config_str())
    step_fn = TrainStep.create(model, mesh, configs.optimizer, train.num_steps, train.grad_accum_steps,
                               train.z_loss)
    metadata = ckpt.CheckpointMetadata(model_config=configured, kind="train", source=train.run_name,
                                       gin_config=gin.config_str())
    checkpointer = TrainCheckpointer(os.path.join(train.output_dir, "checkpoints"), metadata=metadata,
                                     keep=train.keep_checkpoints, async_save=train.async_checkpointing, mesh=mesh)
    state, start_step = _initial_state(train, model, step_fn, checkpointer, stream)

    writer = MetricsWriter(train.output_dir, total_steps=train.num_steps, start_step=start_step, enabled=primary)
    watcher = hooks.PreemptionWatcher()
    tokens_per_step = train.batch_size * data.seq_len
    logger = hooks.LogHook(writer, every=train.log_every, tokens_per_step=tokens_per_step,
                           flops_per_step=tokens_per_step * training_flops_per_token(model, data.seq_len),
                           peak_flops=peak_flops_total(list(mesh.devices.flat), train.peak_flops_per_device,
                                                       model.dtype),
                           max_bad_steps=train.max_bad_steps)
    saver = hooks.CheckpointHook(checkpointer, every=train.checkpoint_every, data_state=stream.get_state)
    all_hooks = [logger, saver, _eval_hook(train, data, model, mesh, writer, watcher, renderer)]

    step = start_step
    try:
        while step < train.num_steps:
            started = time.perf_counter()
            local = next(stream)
            input_seconds = time.perf_counter() - started
            state, metrics = step_fn(state, sharding.global_batch(local, mesh))
            step += 1
            logger.record(step, metrics, input_seconds)
            for hook in all_hooks:
                hook(step, state, step == train.num_steps)
            if step < train.num_steps and watcher.should_stop(step):
                logger.flush(step)  # The steps since the last write are logged, not lost.
                saver.save(step, state)
                log.warning("preemption requested: saved step %d; rerun the same command to resume", step)
                break
        checkpointer.wait()
    finally:
        stream.close()
        writer.close()
        checkpointer.close()
    if step == train.num_steps and train.export_hf_dir:
        _export(train, renderer.vocab)
    if primary:
        print(f"step {step}/{train.num_steps} done. checkpoints: {checkpointer.directory}  metrics: {writer.path}  "
              f"tensorboard: {writer.tensorboard_dir}"
              + (f"  hugging face export: {train.export_hf_dir}" if train.export_hf_dir and step == train.num_steps
                 else ""), flush=True)
    return step


def _initial_state(train: TrainConfig, model: ModelConfig, step_fn: TrainStep, checkpointer: TrainCheckpointer,
                   stream) -> tuple[dict[str, Any], int]:
    """Resume this run, else start from init_from / init_from_hf, else random init."""
    restored = checkpointer.restore_latest(step_fn.abstract_state(), stream.global_state_shape)
    if restored is not None:
        step, state, data_state = restored
        stream.set_state(data_state)
        log.info("resumed from %s/%d", checkpointer.directory, step)
        return state, step
    init_from = train.init_from or (train.init_from_hf and _converted_hf(train, model))
    if init_from:
        params = ckpt.StoredCheckpoint(init_from).restore_params(model, shardings=step_fn.state_shardings["params"])
        log.info("initialised params from %s", init_from)
        return step_fn.from_params(params), 0
    return step_fn.init(jax.random.key(train.seed)), 0


def _check_init(train: TrainConfig, model: ModelConfig) -> None:
    """Before a new run writes anything: ConfigError naming the binding when TrainConfig.init_from is not a
    checkpoint of the configured architecture, or init_from_hf has no config.json of that architecture."""
    if (epath.Path(train.output_dir) / "checkpoints").exists():  # Resuming: init_from is not read.
        return
    binding = "TrainConfig.init_from" if train.init_from else "TrainConfig.init_from_hf"
    try:
        if train.init_from:
            stored, what = ckpt.StoredCheckpoint(train.init_from).model_config, "the checkpoint"
        elif train.init_from_hf:
            stored, what = read_hf_config(train.init_from_hf)[0], "config.json"
        else:
            return
    except (ConfigError, ckpt.CheckpointError) as e:
        raise ConfigError(f"{binding}: {e}") from None
    mismatches = ckpt.architecture_mismatches(stored, model)
    if mismatches:
        raise ConfigError(f"{binding}={train.init_from or train.init_from_hf}: {what} differs from the gin "
                          f"ModelConfig: {'; '.join(mismatches)}")


def _converted_hf(train: TrainConfig, model: ModelConfig) -> str:
    """Convert TrainConfig.init_from_hf into output_dir/init once (process 0; others wait)."""
    target = os.path.join(train.output_dir, "init")
    if jax.process_index() == 0 and not epath.Path(target).exists():
        convert_hf_to_orbax(train.init_from_hf, target, dtype=model.param_dtype, scan_layers=model.scan_layers,
                            vocab_pad_multiple=model.vocab_pad_multiple)
    distributed.barrier("init_from_hf converted")
    return target


def _eval_hook(train: TrainConfig, data: DataConfig, model: ModelConfig, mesh, writer: MetricsWriter,
               watcher: hooks.PreemptionWatcher, renderer) -> hooks.EvalHook:
    rows = data.eval_batch_size or train.batch_size

    def evaluate(params, should_stop) -> dict[str, float]:
        from hephaestus_jax.data import mixtures  # lazy: imports seqio (TensorFlow).

        spec = StreamSpec(global_rows=rows, seq_len=data.seq_len, process_index=jax.process_index(),
                          process_count=jax.process_count())
        streams = mixtures.eval_streams(data, spec, renderer=renderer)
        streams = {name: hooks.until(should_stop, stream) for name, stream in streams.items()}
        results = heldout.heldout_losses(model, params, streams, mesh, max_batches=train.eval_max_batches)
        if train.function_calling_eval and not should_stop():
            results.update(_function_calling_scalars(train, model, rows, params, mesh, renderer))
        return results

    return hooks.EvalHook(writer, every=train.eval_every, evaluate=evaluate, should_stop=watcher.requested)


def _function_calling_scalars(train: TrainConfig, model: ModelConfig, batch_size: int, params, mesh,
                              renderer) -> dict[str, float]:
    """`eval/function_calling/<category>` and `.../overall` accuracy on TrainConfig.function_calling_eval, in
    batches of `batch_size` prompts."""
    questions, answers = function_calling.load_bfcl(train.function_calling_eval)
    report = function_calling.function_calling_accuracy(
        model, params, renderer, questions, answers, max_new_tokens=train.function_calling_max_new_tokens,
        batch_size=batch_size, limit=train.function_calling_limit, mesh=mesh)
    scalars = {f"eval/function_calling/{c.category}": c.accuracy for c in report.categories}
    scalars["eval/function_calling/overall"] = report.macro_accuracy
    return scalars


def _export(train: TrainConfig, vocabulary) -> None:
    """Write the final checkpoint's params as a Hugging Face model (process 0)."""
    if jax.process_index() == 0:
        tokenizer = getattr(vocabulary, "path", None)
        convert_orbax_to_hf(os.path.join(train.output_dir, "checkpoints"), train.export_hf_dir,
                            tokenizer_dir=tokenizer)
    distributed.barrier("hugging face export")


@command.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], required=True, help="gin config (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'TrainConfig.seed=1'")
    args = parser.parse_args(argv)
    gin_configs.log_to_stderr()
    distributed.initialize()
    gin_configs.load_gin(args.gin_file, args.gin_param)
    configs = gin_configs.build_configs()
    output = epath.Path(configs.train.output_dir)
    new_output = jax.process_index() == 0 and not output.exists()
    try:
        run(configs)
    except BaseException:
        if new_output:
            _remove_failed_start(output)
        raise
    return 0


def _remove_failed_start(output: epath.Path) -> None:
    """Delete the output_dir a run created if it failed before it logged a step or saved a checkpoint (a bad
    input found late, a compile error): nothing in it is worth keeping, and the next run starts clean."""
    metrics = output / "metrics.jsonl"
    checkpoints = output / "checkpoints"
    logged = metrics.exists() and metrics.read_text().strip()
    saved = checkpoints.exists() and any(child.name.isdigit() for child in checkpoints.iterdir())
    if not logged and not saved:
        output.rmtree(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
