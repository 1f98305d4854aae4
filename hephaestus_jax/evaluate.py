"""Evaluation of a checkpoint: held-out loss per Forge task, and BFCL function-calling accuracy.

    python -m hephaestus_jax.evaluate loss --gin_file configs/stage1_cpt.gin --checkpoint_dir DIR [--step N]
        [--split validation] [--max_batches N] [--output losses.jsonl]
    python -m hephaestus_jax.evaluate function_calling --checkpoint_dir DIR --dataset BFCL_DIR --output results.json
        [--category simple ...] [--limit N] [--max_new_tokens 256] [--max_steps 20] [--batch_size 8]
    python -m hephaestus_jax.evaluate function_calling --predictions results.records.jsonl --dataset BFCL_DIR

`loss` reads the held-out split of every task of the gin-configured mixture (DataConfig.eval_mixture, else
DataConfig.mixture) and reports the token-weighted mean next-token NLL per task, under the keys the trainer logs
(`eval/loss/forge_code`, ...; `eval.heldout`). `function_calling` answers BFCL's questions with the model
(single-turn prompts and multi-turn conversations against BFCL's back-ends, in the model's chat template, greedy),
scores them with BFCL's own checkers and prints accuracy per category with exact intervals and the leaderboard's
aggregates (`eval.function_calling`, docs/bfcl.md); it writes the results and one record per question (JSON lines
that `--predictions` re-scores without a model, as it does BFCL's own result files).
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath

from hephaestus_jax import distributed, gin_configs, inference, sharding
from hephaestus_jax.config import CHAT_FORMAT_NAMES, DataConfig, MeshConfig, check_no_placeholders
from hephaestus_jax.convert import remote
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.errors import InputError
from hephaestus_jax.eval import bfcl, bfcl_files, function_calling, heldout, multi_turn

log = logging.getLogger("hephaestus_jax.evaluate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hephaestus_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    loss = commands.add_parser("loss", help="held-out loss per Forge task")
    loss.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    loss.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    loss.add_argument("--checkpoint_dir", required=True)
    loss.add_argument("--step", type=int, default=None, help="default: the latest")
    loss.add_argument("--mixture", default=None, help="default: DataConfig.eval_mixture, else DataConfig.mixture")
    loss.add_argument("--split", default=None, help="default: DataConfig.eval_split")
    loss.add_argument("--seq_len", type=int, default=None, help="default: DataConfig.seq_len")
    loss.add_argument("--batch_size", type=int, default=None,
                      help="global rows per batch; default: DataConfig.eval_batch_size, else TrainConfig.batch_size")
    loss.add_argument("--max_batches", type=int, default=None, help="per task; default: the whole split")
    loss.add_argument("--output", default=None,
                      help="write the results here as one JSON line (metrics.jsonl form) instead of printing it")

    calling = commands.add_parser("function_calling", help="BFCL function-calling accuracy")
    source = calling.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint_dir", help="generate with this checkpoint")
    source.add_argument("--predictions", help="score these predictions (JSON lines {id, result}) instead")
    calling.add_argument("--step", type=int, default=None, help="default: the latest")
    calling.add_argument("--tokenizer", default=None, help="default: the shipped Llama-3 tokenizer")
    calling.add_argument("--chat_format", choices=CHAT_FORMAT_NAMES, default=None,
                         help="how prompts render (default: the tokenizer's own chat template, else the fallback its "
                         "special tokens match)")
    calling.add_argument("--dataset", required=True,
                         help="a BFCL question file, or a directory of BFCL_v3/v4_*.json (bfcl-eval's data/ too)")
    calling.add_argument("--answers", default=None,
                         help="possible-answer file or directory; default: DATASET/possible_answer")
    calling.add_argument("--category", action="append", default=[], help="keep only this category (repeatable)")
    calling.add_argument("--limit", type=int, default=None, help="at most this many questions per category")
    calling.add_argument("--output", default=None, help="write the results JSON here (default: print the table "
                         "only); with --checkpoint_dir the raw outputs go next to it as <name>.predictions.jsonl")
    calling.add_argument("--max_new_tokens", type=int, default=256, help="per model step")
    calling.add_argument("--max_steps", type=int, default=multi_turn.MAXIMUM_STEP_LIMIT,
                         help="multi-turn: steps a user turn may take before BFCL's force-quit (default BFCL's)")
    calling.add_argument("--batch_size", type=int, default=8)
    calling.add_argument("--tensor_parallel", type=int, default=1, help="devices each model copy is split over")
    return parser


def run_loss(args: argparse.Namespace) -> int:
    from hephaestus_jax.data import mixtures  # lazy: imports seqio (TensorFlow).

    gin_configs.load_gin(args.gin_file, args.gin_param)
    data = DataConfig()
    check_no_placeholders(data)
    mixture = args.mixture or data.eval_mixture or data.mixture
    split = args.split or data.eval_split
    seq_len = args.seq_len or data.seq_len
    rows = args.batch_size or data.eval_batch_size or gin_configs.bound_train_batch_size()
    model = inference.load_model(args.checkpoint_dir, args.step, MeshConfig())
    renderer = mixtures.renderer_of(data)
    inference.check_vocabulary(renderer.vocab, model.config)
    shards = sharding.batch_shards(model.mesh)
    if rows % shards:
        padded = -(-rows // shards) * shards
        log.info("eval batch of %d rows padded to %d (a multiple of the %d batch shards)", rows, padded, shards)
        rows = padded
    spec = StreamSpec(global_rows=rows, seq_len=seq_len, process_index=jax.process_index(),
                      process_count=jax.process_count())
    streams = mixtures.eval_streams(data, spec, name=mixture, split=split, renderer=renderer)
    results = heldout.heldout_losses(model.config, model.params, streams, model.mesh, max_batches=args.max_batches)
    if jax.process_index() == 0:
        print(f"held-out loss of {args.checkpoint_dir} step {model.step} on {mixture} ({split}):")
        print(heldout.format_loss_table(results))
        line = json.dumps({"step": model.step, **results})
        if args.output:
            epath.Path(args.output).write_text(line + "\n")
        else:
            print(line)
    return 0


def run_function_calling(args: argparse.Namespace) -> int:
    command.require("bfcl")  # Scoring is BFCL's own: before any model is loaded.
    if args.checkpoint_dir and not args.output:
        raise InputError("--output is required with --checkpoint_dir: a model's run writes its results and one "
                         "record per question")
    all_questions, answers = function_calling.load_bfcl(args.dataset, args.answers)
    questions = function_calling.select_questions(all_questions, args.category, args.limit)
    run: dict[str, Any] = {"dataset": args.dataset, "categories": args.category, "limit": args.limit}
    if args.predictions:
        left_out = {question.id for question in all_questions} - {question.id for question in questions}
        predictions = {question_id: prediction for question_id, prediction in
                       bfcl_files.load_predictions(args.predictions).items() if question_id not in left_out}
        run["predictions"] = args.predictions
    else:
        from hephaestus_jax.data.chat_format import resolve_chat_format  # lazy: TensorFlow.
        from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary  # lazy: TensorFlow.

        with remote.local_input(args.tokenizer or default_tokenizer_path()) as tokenizer:  # gs://: a local copy.
            renderer = resolve_chat_format(load_vocabulary(tokenizer), args.chat_format)
        model = inference.load_model(args.checkpoint_dir, args.step,
                                     inference.inference_mesh_config(args.tensor_parallel))
        inference.check_vocabulary(renderer.vocab, model.config)
        predictions = function_calling.predict(model.config, model.params, renderer, questions,
                                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                               mesh=model.mesh, step_limit=args.max_steps)
        run.update(checkpoint_dir=args.checkpoint_dir, step=model.step, max_new_tokens=args.max_new_tokens,
                   max_steps=args.max_steps, chat_format=args.chat_format)
    report = bfcl.score(questions, answers, predictions)
    if jax.process_index() == 0:
        print(bfcl.format_table(report))
        if args.output:
            run["records"] = function_calling.records_path(args.output)
            function_calling.write_records(run["records"], report)
            epath.Path(args.output).write_text(json.dumps({"run": run, "report": report.to_dict()}, indent=2,
                                                          ensure_ascii=False))
            print(f"results: {args.output}  records: {run['records']}")
    return 0


@command.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    gin_configs.log_to_stderr()
    distributed.initialize()
    with command.input_errors(ValueError):
        return (run_loss if args.command == "loss" else run_function_calling)(args)


if __name__ == "__main__":
    sys.exit(main())
