"""Choose a run's remat policy and micro-batch count by compiling the candidates for a TPU topology (aot.py).

Candidates are `ModelConfig.remat_policy` x `TrainConfig.grad_accum_steps` (the micro-batch counts whose
micro-batch splits evenly over the data x fsdp shards). The winner is the fastest roofline step among those that
leave at least `min_headroom` of HBM free; steps within `TIE` of the fastest count as equal (the roofline is a
bound, not a measurement) and go to the fewest micro-batches (each one all-gathers the weights and
reduce-scatters the gradients again over ICI, which the roofline does not count), then the most headroom.

Each 8B or 70B compile takes minutes on a small CPU, so candidates that cannot win are skipped:
- memory: the policies save nested sets of activations (`REMAT_ORDER`), and more micro-batches mean fewer rows
  live at once, so a candidate that saves at least as much with at most as many micro-batches as one that did
  not fit with the headroom needs at least as much memory: skipped;
- speed: a step's FLOPs do not depend on the micro-batch count (only the gradient-accumulation adds do, a
  fraction of a percent), so a candidate's step is at least the compute time of a compiled candidate with the
  same policy: skipped when that is already slower than the best step by more than `TIE`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from hephaestus_jax import aot
from hephaestus_jax.gin_configs import Configs
from hephaestus_jax.config import ConfigError
from hephaestus_jax.tpu_catalog import GIB

# Remat policies from the one that saves least for the backward pass to the one that saves most; each saves a
# superset of what the previous one saves (the four projections qkv_out keeps are dots without batch dimensions).
REMAT_ORDER = ("full", "qkv_out", "dots_no_batch", "dots", "none")
MIN_HEADROOM = 0.20
TIE = 0.01  # Roofline steps within 1% of the fastest are equally fast.


@dataclasses.dataclass(frozen=True)
class Candidate:
    remat_policy: str
    grad_accum_steps: int

    def bindings(self) -> list[str]:
        """The gin bindings that select this candidate."""
        return [f"ModelConfig.remat_policy = '{self.remat_policy}'",
                f"TrainConfig.grad_accum_steps = {self.grad_accum_steps}"]

    def saves_at_least(self, other: Candidate) -> bool:
        """Whether this candidate keeps at least `other`'s activations live: it saves a superset of them with at
        most as many micro-batches (so at least as many rows at once)."""
        return (REMAT_ORDER.index(self.remat_policy) >= REMAT_ORDER.index(other.remat_policy)
                and self.grad_accum_steps <= other.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One candidate: its compiled report, or why it has none (the compiler refused it, or it was skipped)."""

    candidate: Candidate
    report: aot.StepReport | None = None  # Also set for a compiled step that does not fit in HBM.
    refused: str | None = None  # The TPU compiler's out-of-memory message.
    skipped: str | None = None
    compile_seconds: float = 0.0

    def too_big(self, min_headroom: float) -> bool:
        return self.refused is not None or (self.report is not None and self.report.headroom < min_headroom)

    def eligible(self, min_headroom: float) -> bool:
        return self.report is not None and not self.too_big(min_headroom)


def candidates(batch_size: int, batch_shards: int, policies: Sequence[str] = REMAT_ORDER,
               grad_accum_steps: Sequence[int] | None = None) -> list[Candidate]:
    """The candidates in search order: fewest rows per micro-batch first (most micro-batches), and within a
    micro-batch count the policies in REMAT_ORDER; so the smallest programs compile first and their failures
    prune the bigger ones. `grad_accum_steps` None: every count whose micro-batch is a multiple of
    `batch_shards` (data x fsdp). ConfigError for an unknown policy or a count that does not split the batch."""
    unknown = [p for p in policies if p not in REMAT_ORDER]
    if unknown or not policies:
        raise ConfigError(f"remat policies {list(policies)}: expected some of {list(REMAT_ORDER)}")
    valid = [a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % batch_shards == 0]
    if grad_accum_steps is None:
        counts = valid
    else:
        bad = [a for a in grad_accum_steps if a not in valid]
        if bad or not grad_accum_steps:
            raise ConfigError(f"grad_accum_steps {list(grad_accum_steps)}: with batch_size {batch_size} over "
                              f"{batch_shards} data x fsdp shards, the micro-batch counts are {valid}")
        counts = list(grad_accum_steps)
    ordered = [p for p in REMAT_ORDER if p in policies]
    return [Candidate(p, a) for a in sorted(set(counts), reverse=True) for p in ordered]


def skip_reason(candidate: Candidate, done: Sequence[Outcome], min_headroom: float = MIN_HEADROOM) -> str | None:
    """Why `candidate` cannot win given the outcomes so far (None: compile it); the rules of the module doc."""
    for outcome in done:
        if outcome.too_big(min_headroom) and candidate.saves_at_least(outcome.candidate):
            c = outcome.candidate
            return f"needs at least the memory of {c.remat_policy} x {c.grad_accum_steps}, which did not fit"
    best = fastest(done, min_headroom)
    if best is None:
        return None
    for outcome in done:
        if (outcome.report is not None and outcome.candidate.remat_policy == candidate.remat_policy
                and outcome.report.compute_seconds > (1 + TIE) * best.report.step_seconds):
            return (f"its compute alone ({outcome.report.compute_seconds:.4g} s, as {candidate.remat_policy} x "
                    f"{outcome.candidate.grad_accum_steps}) is slower than the best step "
                    f"({best.report.step_seconds:.4g} s)")
    return None


def fastest(outcomes: Sequence[Outcome], min_headroom: float = MIN_HEADROOM) -> Outcome | None:
    """The eligible outcome with the shortest roofline step (None if none is eligible)."""
    eligible = [o for o in outcomes if o.eligible(min_headroom)]
    return min(eligible, key=lambda o: o.report.step_seconds) if eligible else None


def choose(outcomes: Sequence[Outcome], min_headroom: float = MIN_HEADROOM) -> Outcome | None:
    """The winner: among eligible outcomes within TIE of the fastest step, the fewest micro-batches, then the most
    headroom, then the fastest step."""
    best = fastest(outcomes, min_headroom)
    if best is None:
        return None
    ties = [o for o in outcomes if o.eligible(min_headroom)
            and o.report.step_seconds <= (1 + TIE) * best.report.step_seconds]
    return min(ties, key=lambda o: (o.candidate.grad_accum_steps, -o.report.headroom, o.report.step_seconds))


Compile = Callable[[Configs, aot.Topology], aot.StepReport]


def with_candidate(configs: Configs, candidate: Candidate) -> Configs:
    """`configs` with the candidate's remat policy and micro-batch count."""
    return dataclasses.replace(
        configs, model=dataclasses.replace(configs.model, remat_policy=candidate.remat_policy),
        train=dataclasses.replace(configs.train, grad_accum_steps=candidate.grad_accum_steps))


def search(configs: Configs, topology: aot.Topology, todo: Sequence[Candidate],
           min_headroom: float = MIN_HEADROOM, max_compiles: int | None = None,
           compile_step: Compile = aot.compile_train_step,
           progress: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Compile the candidates in order, skipping those that cannot win (`skip_reason`) and, past `max_compiles`
    compiles, the rest; `progress` sees each outcome as it comes."""
    done: list[Outcome] = []
    compiles = 0
    for candidate in todo:
        reason = skip_reason(candidate, done, min_headroom)
        if reason is None and max_compiles is not None and compiles >= max_compiles:
            reason = f"over the budget of {max_compiles} compiles"
        if reason is not None:
            outcome = Outcome(candidate, skipped=reason)
        else:
            compiles += 1
            start = time.perf_counter()
            try:
                outcome = Outcome(candidate, report=compile_step(with_candidate(configs, candidate), topology))
            except aot.DoesNotFit as e:
                outcome = Outcome(candidate, report=e.report,
                                  refused=None if e.report else " ".join(str(e).split())[:300])
            outcome = dataclasses.replace(outcome, compile_seconds=time.perf_counter() - start)
        done.append(outcome)
        progress(outcome)
    return done


def format_outcome(outcome: Outcome, min_headroom: float = MIN_HEADROOM, chosen: bool = False) -> str:
    """One table row: remat | micro-batches | rows per shard | GiB per chip (XLA peak) | headroom | compute s |
    HBM s | step s | MFU | bound | note | compile s."""
    c, r = outcome.candidate, outcome.report
    head = f"| {c.remat_policy} | {c.grad_accum_steps} |"
    if r is None:
        note = f"skipped: {outcome.skipped}" if outcome.skipped else f"refused by the compiler: {outcome.refused}"
        return f"{head} | | | | | | | | {note} | {outcome.compile_seconds:.0f} |"
    rows = r.batch_size // c.grad_accum_steps / (r.mesh_shape["data"] * r.mesh_shape["fsdp"])
    bound = "compute" if r.compute_seconds >= r.memory_seconds else "HBM"
    note = "**chosen**" if chosen else "fits" if outcome.eligible(min_headroom) else \
        f"headroom under {100 * min_headroom:.0f}%" if r.fits else "does not fit in HBM"
    return (f"{head} {rows:g} | {r.total_bytes / GIB:.2f} ({r.peak_bytes / GIB:.2f}) | {100 * r.headroom:.1f}% | "
            f"{r.compute_seconds:.4g} | {r.memory_seconds:.4g} | {r.step_seconds:.4g} | {100 * r.mfu:.1f}% | "
            f"{bound} | {note} | {outcome.compile_seconds:.0f} |")


def format_table(outcomes: Sequence[Outcome], min_headroom: float = MIN_HEADROOM) -> str:
    """A Markdown table of every outcome, the winner in bold, then the winner's bindings."""
    header = ["| remat | micro-batches | rows per micro-batch per data x fsdp shard | per chip GiB (XLA peak) | "
              "headroom | compute s | HBM s | roofline step s | MFU <= | bound | note | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    winner = choose(outcomes, min_headroom)
    rows = [format_outcome(o, min_headroom, chosen=o is winner) for o in outcomes]
    if winner is None:
        footer = [f"no candidate fits with {100 * min_headroom:.0f}% HBM headroom"]
    else:
        footer = [f"chosen: {winner.candidate.remat_policy} x {winner.candidate.grad_accum_steps} micro-batches, "
                  f"roofline step {winner.report.step_seconds:.4g} s, MFU <= {100 * winner.report.mfu:.1f}%, "
                  f"headroom {100 * winner.report.headroom:.1f}%; gin bindings:",
                  *(f"  {b}" for b in winner.candidate.bindings())]
    return "\n".join(header + rows + [""] + footer)
