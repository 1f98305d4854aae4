"""Evaluation of a checkpoint: held-out loss per Forge task, and BFCL function-calling accuracy.

    python -m hephaestus_jax.evaluate loss --gin_file configs/stage1_cpt.gin --checkpoint_dir DIR [--step N]
        [--split validation] [--max_batches N] [--output losses.jsonl]
    python -m hephaestus_jax.evaluate function_calling --checkpoint_dir DIR --dataset BFCL_DIR
        [--category simple ...] [--output results.json] [--max_new_tokens 256] [--batch_size 8]
    python -m hephaestus_jax.evaluate function_calling --predictions results.predictions.jsonl --dataset BFCL_DIR

`loss` reads the held-out split of every task of the gin-configured mixture (DataConfig.eval_mixture, else
DataConfig.mixture) and reports the token-weighted mean next-token NLL per task, under the keys the trainer logs
(`eval/loss/forge_code`, ...). `function_calling` prompts the model with each BFCL question and its functions in
the Llama-3.1 tool-calling format, decodes greedily and scores the output with `eval.bfcl` (AST match); with
`--output`, the results and the raw outputs (JSON lines that `--predictions` re-scores without a model) are
written; without it, nothing is.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from hephaestus_jax import checkpoint_format as ckpt
from hephaestus_jax import generate, losses, sharding
from hephaestus_jax.config import ConfigError, DataConfig, MeshConfig, ModelConfig
from hephaestus_jax.data import forge
from hephaestus_jax.eval import bfcl

if TYPE_CHECKING:
    import seqio  # Imports TensorFlow; only chat rendering needs it at run time.

log = logging.getLogger("hephaestus_jax.evaluate")

LOSS_KEY = "eval/loss"
TOKENS_KEY = "eval/tokens"
BFCL_FILE_GLOB = "BFCL_v3_*.json"
ANSWERS_SUBDIR = "possible_answer"
BFCL_FUNCTION_FIELDS = ("name", "description", "parameters")
"""What the model is shown of a BFCL function document."""


# ------------------------------------------------------------------------------------------------ held-out loss


@functools.lru_cache(maxsize=None)
def _loss_sums(config: ModelConfig):
    """The jitted `losses.batch_loss_sums` for `config` (one per config, so repeated evaluations reuse it)."""
    return jax.jit(functools.partial(losses.batch_loss_sums, config))


def _host_value(array: jax.Array) -> float:
    """A replicated scalar's value (works on every process of a multi-host run)."""
    return float(np.asarray(array.addressable_data(0)))


def heldout_losses(config: ModelConfig, params: Any, streams: Mapping[str, Iterable[dict[str, np.ndarray]]],
                   mesh: Mesh, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token NLL of each stream of packed batches (this process's rows of each batch).

    Returns `eval/loss/<name>` and `eval/tokens/<name>` (the loss weight summed over the batches) per stream, and
    `eval/loss` over all streams together. A stream that contributed no tokens has no loss entry. `params` are
    placed on `mesh` (as the trainer holds them); every process must pass the same number of batches.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    loss_sums = _loss_sums(config)
    results: dict[str, float] = {}
    total_nll = total_weight = 0.0
    with sharding.activate(mesh):
        for name, stream in streams.items():
            sums = [loss_sums(params, sharding.global_batch(local, mesh))
                    for local in itertools.islice(stream, max_batches)]
            nll = sum(_host_value(s["nll"]) for s in sums)
            weight = sum(_host_value(s["weight"]) for s in sums)
            results[f"{TOKENS_KEY}/{name}"] = weight
            if weight > 0:
                results[f"{LOSS_KEY}/{name}"] = nll / weight
            else:
                log.warning("held-out loss of %s: no tokens evaluated", name)
            total_nll, total_weight = total_nll + nll, total_weight + weight
    if total_weight > 0:
        results[LOSS_KEY] = total_nll / total_weight
    return results


def format_loss_table(results: Mapping[str, float]) -> str:
    """One row per task (loss, tokens), then all tasks together."""
    names = [key[len(TOKENS_KEY) + 1:] for key in results if key.startswith(TOKENS_KEY + "/")]
    width = max(len("all"), len("task"), *(len(name) for name in names))
    rows = [f"{'task':<{width}}  {'loss':>9}  {'tokens':>12}"]
    for name in names:
        loss = results.get(f"{LOSS_KEY}/{name}")
        rows.append(f"{name:<{width}}  {'-' if loss is None else f'{loss:.4f}':>9}  "
                    f"{int(results[f'{TOKENS_KEY}/{name}']):>12}")
    if LOSS_KEY in results:
        total = sum(int(results[f"{TOKENS_KEY}/{name}"]) for name in names)
        rows.append(f"{'all':<{width}}  {results[LOSS_KEY]:>9.4f}  {total:>12}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ BFCL


def load_bfcl(dataset: str, answers: str | None = None) -> tuple[list[bfcl.Question], dict[str, bfcl.GroundTruth]]:
    """Questions and ground truths from BFCL files or directories.

    A `dataset` directory means every BFCL_v3_*.json in it, with answers by default from its possible_answer/
    folder when there is one (the irrelevance categories need none); an `answers` directory means every
    BFCL_v3_*.json in it. Question ids must be unique across files.
    """
    if answers is None and os.path.isdir(os.path.join(dataset, ANSWERS_SUBDIR)):
        answers = os.path.join(dataset, ANSWERS_SUBDIR)
    questions: list[bfcl.Question] = []
    seen: set[str] = set()
    for path in _bfcl_files(dataset):
        for question in bfcl.load_questions(path):
            if question.id in seen:
                raise bfcl.BFCLFormatError(f"{path}: question id {question.id!r} appears in more than one file")
            seen.add(question.id)
            questions.append(question)
    ground_truths: dict[str, bfcl.GroundTruth] = {}
    for path in _bfcl_files(answers) if answers is not None else ():
        ground_truths.update(bfcl.load_answers(path))
    return questions, ground_truths


def _bfcl_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).glob(BFCL_FILE_GLOB))
        if not files:
            raise FileNotFoundError(f"{path}: no {BFCL_FILE_GLOB} files in this directory")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such BFCL file or directory")
    return [path]


def select_questions(questions: Sequence[bfcl.Question], categories: Sequence[str] = (),
                     limit: int | None = None) -> list[bfcl.Question]:
    """The questions of `categories` (all when empty; each must have questions), at most `limit` per category,
    in their original order."""
    wanted = {bfcl.canonical_category(category) for category in categories}
    empty = sorted(wanted - {question.category for question in questions})
    if empty:
        raise ValueError(f"no questions of categories {empty}")
    counts: dict[str, int] = {}
    selected = []
    for question in questions:
        if wanted and question.category not in wanted:
            continue
        counts[question.category] = counts.get(question.category, 0) + 1
        if limit is None or counts[question.category] <= limit:
            selected.append(question)
    return selected


def bfcl_prompt(question: bfcl.Question, vocab: seqio.Vocabulary) -> np.ndarray:
    """The question as a Llama-3.1 chat with its functions in the system prompt, ending in an open assistant turn."""
    from hephaestus_jax.data.chat_format import render_chat_prompt

    if len(question.turns) != 1:
        raise ValueError(f"question {question.id!r} has {len(question.turns)} turns; only single-turn categories "
                         "are supported")
    where = f"question {question.id!r}"
    tools = tuple(generate.tool_doc({key: function[key] for key in BFCL_FUNCTION_FIELDS if key in function},
                                    f"{where} function {index}")
                  for index, function in enumerate(question.functions))
    messages = tuple(forge.Message(role=message["role"], content=message["content"])
                     for message in question.turns[0])
    try:
        return render_chat_prompt(messages, tools, vocab)
    except forge.ForgeFormatError as e:
        raise ValueError(f"{where}: {e}") from None


def predict_function_calls(config: ModelConfig, params: Any, vocab: seqio.Vocabulary,
                           questions: Sequence[bfcl.Question], *, max_new_tokens: int, batch_size: int,
                           mesh: Mesh | None = None) -> dict[str, str]:
    """Greedy completion (text up to the first stop token) of every question's prompt, by question id.

    Questions are batched by prompt length; every batch has `batch_size` rows, so one compilation per length
    bucket serves the whole run.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompts = {question.id: bfcl_prompt(question, vocab) for question in questions}
    order = sorted(prompts, key=lambda question_id: prompts[question_id].size)
    stop_ids = generate.stop_ids_of(vocab)
    predictions = {}
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        result = generate.generate(config, params, [prompts[i] for i in ids], max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, pad_id=vocab.pad_id, mesh=mesh, batch_size=batch_size)
        for row, question_id in enumerate(ids):
            predictions[question_id] = vocab.decode(result.completion(row).tolist())
        log.info("function calling: %d/%d questions", len(predictions), len(order))
    return predictions


def function_calling_accuracy(config: ModelConfig, params: Any, vocab: seqio.Vocabulary,
                              questions: Sequence[bfcl.Question], answers: Mapping[str, bfcl.GroundTruth], *,
                              max_new_tokens: int, batch_size: int, limit: int | None = None,
                              mesh: Mesh | None = None) -> bfcl.Report:
    """BFCL accuracy of the model on (the first `limit` per category of) `questions`, decoding greedily."""
    selected = select_questions(questions, limit=limit)
    predictions = predict_function_calls(config, params, vocab, selected, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, mesh=mesh)
    return bfcl.score(selected, answers, predictions)


def write_predictions(path: str, predictions: Mapping[str, str]) -> None:
    """JSON lines {"id", "result"}: the form `bfcl.load_predictions` reads."""
    epath.Path(path).write_text("".join(json.dumps({"id": question_id, "result": text}, ensure_ascii=False) + "\n"
                                        for question_id, text in predictions.items()))


def predictions_path(results_path: str) -> str:
    """Where the raw predictions of a results file go: results.json -> results.predictions.jsonl."""
    return str(Path(results_path).with_suffix("")) + ".predictions.jsonl"


# ------------------------------------------------------------------------------------------------ CLI


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
    calling.add_argument("--dataset", required=True, help="a BFCL question file, or a directory of BFCL_v3_*.json")
    calling.add_argument("--answers", default=None,
                         help="possible-answer file or directory; default: DATASET/possible_answer")
    calling.add_argument("--category", action="append", default=[], help="keep only this category (repeatable)")
    calling.add_argument("--limit", type=int, default=None, help="at most this many questions per category")
    calling.add_argument("--output", default=None, help="write the results JSON here (default: print the table "
                         "only); with --checkpoint_dir the raw outputs go next to it as <name>.predictions.jsonl")
    calling.add_argument("--max_new_tokens", type=int, default=256)
    calling.add_argument("--batch_size", type=int, default=8)
    calling.add_argument("--tensor_parallel", type=int, default=1, help="devices each model copy is split over")
    return parser


def check_vocabulary(vocab: seqio.Vocabulary, config: ModelConfig) -> None:
    """ConfigError when the tokenizer has ids the model cannot embed."""
    if vocab.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab.vocab_size} tokens but the checkpoint's model has "
                          f"vocab_size={config.vocab_size}")


def _train_batch_size() -> int:
    """TrainConfig.batch_size as bound in gin, else its default (constructing TrainConfig needs output_dir)."""
    import gin

    from hephaestus_jax.config import TrainConfig

    try:
        return int(gin.query_parameter("TrainConfig.batch_size"))
    except ValueError:  # Not bound.
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "batch_size")


def run_loss(args: argparse.Namespace) -> int:
    from hephaestus_jax import train
    from hephaestus_jax.data import tasks

    train.load_gin(args.gin_file, args.gin_param)
    data = DataConfig()
    mixture = args.mixture or data.eval_mixture or data.mixture
    split = args.split or data.eval_split
    seq_len = args.seq_len or data.seq_len
    rows = args.batch_size or data.eval_batch_size or _train_batch_size()
    tasks.register_forge_tasks()
    model = generate.load_model(args.checkpoint_dir, args.step, MeshConfig())
    check_vocabulary(tasks.forge_vocabulary(), model.config)
    shards = sharding.batch_shards(model.mesh)
    if rows % shards:
        padded = -(-rows // shards) * shards
        log.info("eval batch of %d rows padded to %d (a multiple of the %d batch shards)", rows, padded, shards)
        rows = padded
    streams = tasks.eval_streams(mixture, global_rows=rows, seq_len=seq_len, process_index=jax.process_index(),
                                 process_count=jax.process_count(), split=split)
    results = heldout_losses(model.config, model.params, streams, model.mesh, max_batches=args.max_batches)
    if jax.process_index() == 0:
        print(f"held-out loss of {args.checkpoint_dir} step {model.step} on {mixture} ({split}):")
        print(format_loss_table(results))
        line = json.dumps({"step": model.step, **results})
        if args.output:
            epath.Path(args.output).write_text(line + "\n")
        else:
            print(line)
    return 0


def run_function_calling(args: argparse.Namespace) -> int:
    all_questions, answers = load_bfcl(args.dataset, args.answers)
    questions = select_questions(all_questions, args.category, args.limit)
    run: dict[str, Any] = {"dataset": args.dataset, "categories": args.category, "limit": args.limit}
    if args.predictions:
        left_out = {question.id for question in all_questions} - {question.id for question in questions}
        predictions = {question_id: prediction for question_id, prediction in
                       bfcl.load_predictions(args.predictions).items() if question_id not in left_out}
        run["predictions"] = args.predictions
    else:
        from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary

        vocab = load_vocabulary(args.tokenizer or default_tokenizer_path())
        model = generate.load_model(args.checkpoint_dir, args.step,
                                    generate.inference_mesh_config(args.tensor_parallel))
        check_vocabulary(vocab, model.config)
        predictions = predict_function_calls(model.config, model.params, vocab, questions,
                                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                             mesh=model.mesh)
        run.update(checkpoint_dir=args.checkpoint_dir, step=model.step, max_new_tokens=args.max_new_tokens)
        if args.output and jax.process_index() == 0:
            run["predictions"] = predictions_path(args.output)
            write_predictions(run["predictions"], predictions)
    report = bfcl.score(questions, answers, predictions)
    if jax.process_index() == 0:
        print(bfcl.format_table(report))
    if args.output and jax.process_index() == 0:
        epath.Path(args.output).write_text(json.dumps({"run": run, "report": report.to_dict()}, indent=2,
                                                      ensure_ascii=False))
        print(f"results: {args.output}" + (f"  predictions: {run['predictions']}" if args.checkpoint_dir else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hephaestus_jax import distributed
    from hephaestus_jax.train import log_to_stderr

    log_to_stderr()
    distributed.initialize()
    command = run_loss if args.command == "loss" else run_function_calling
    try:
        return command(args)
    except (ConfigError, ValueError, FileNotFoundError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
