"""Official metrics of V*, TallyQA, InfoVQA and MVBench from evaluated records, plus RaPR and tool
statistics. Pure: an `EvalOutcome` (the record, the model's whole response text, what its visual
operations did) goes in, numbers come out. Answers are read and judged by `rewards.accuracy`.

Metrics (keys of `summarize(...)["metrics"]`; None when undefined, e.g. no sample in a group):
- every benchmark: `n`, `answered_rate` (a final answer could be extracted), `rapr` (fraction of
  samples with at least one visual operation: one greedy sample per question), `tool_calls_per_sample`,
  `tool_error_rate` (failed operations / operations), `tool_failed_sample_rate` (samples with a
  failed operation), `truncated_rate` (ended by the token or tool-call budget), `response_tokens_mean`,
  `score_with_tools` / `score_without_tools` (the benchmark's per-sample score split by whether the
  sample used a visual operation), `tool_errors/<kind>` (counts), `tool_calls/<tool>` (operations
  per tool: crop_image, select_frames, "unparsed" when no tool name could be read; from the traces).
- vstar: `accuracy` (over all questions) and `accuracy/<category>`, `n/<category>`.
- tallyqa: `accuracy` (exact count), `accuracy/complex` (TallyQA-Complex, the paper's number),
  `accuracy/simple`, `n/complex`, `n/simple`.
- infovqa: `anls` (threshold 0.5, best over the gold answers) and `exact_match` (the boxed answer
  equals a gold after normalization: case, punctuation, articles, whitespace; the public Pixel
  Reasoner eval scores InfoVQA by exact match, so both are reported).
- mvbench: `accuracy` (over all questions), `accuracy_task_mean` (mean of the task accuracies:
  MVBench's "Avg"; equal when every task has 200 questions), `accuracy/<task>`, `n/<task>`.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.eval_data import EvalRecord
from rewards.accuracy import extract_answer, score_answer

# The headline number of each benchmark (the paper's table).
# "heldout": an RL run's own eval split (cluster/heldout.py), scored by each record's verifier.
PRIMARY_METRIC = {"vstar": "accuracy", "tallyqa": "accuracy/complex", "infovqa": "anls", "mvbench": "accuracy",
                  "heldout": "accuracy"}
TRUNCATED_FINISH_REASONS = ("length", "tool_limit")


@dataclass(frozen=True)
class EvalOutcome:
    """What one evaluated question produced: the response (every assistant turn) and its trace."""

    record: EvalRecord
    response_text: str
    num_visual_operations: int = 0
    num_failed_operations: int = 0
    error_kinds: tuple[str, ...] = ()  # one per failed operation (protocol.ERROR_KINDS)
    finish_reason: str = ""
    response_tokens: int = 0
    # The trace: one {"name", "ok", "error_kind", "target_image", "box_pixels", "frames"} per operation
    # (empty when only the counts above are known).
    operations: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        if self.num_visual_operations < 0 or not 0 <= self.num_failed_operations <= self.num_visual_operations:
            raise ValueError(f"{self.record.qid}: need 0 <= failed ({self.num_failed_operations}) <= "
                             f"operations ({self.num_visual_operations})")
        if self.operations and len(self.operations) != self.num_visual_operations:
            raise ValueError(f"{self.record.qid}: {len(self.operations)} traced operations but "
                             f"num_visual_operations = {self.num_visual_operations}")


def score_outcome(outcome: EvalOutcome) -> dict[str, Any]:
    """The per-sample result: the extracted answer, its `score` by the record's verifier (1/0, or
    ANLS for InfoVQA) and, for InfoVQA, the boxed answer's `exact_match`."""
    record = outcome.record
    prediction = extract_answer(outcome.response_text)
    sample: dict[str, Any] = {
        "qid": record.qid,
        "prediction": prediction,
        "golds": list(record.golds),
        "score": score_answer(prediction, record.golds, record.answer_type, record.choices),
    }
    if record.benchmark == "infovqa":
        sample["exact_match"] = score_answer(prediction, record.golds, "text")
    for name in ("category", "task", "subset"):
        if getattr(record, name) is not None:
            sample[name] = getattr(record, name)
    sample.update(
        num_visual_operations=outcome.num_visual_operations,
        num_failed_operations=outcome.num_failed_operations,
        error_kinds=list(outcome.error_kinds),
        finish_reason=outcome.finish_reason,
        response_tokens=outcome.response_tokens,
        operations=[dict(op) for op in outcome.operations],
        response=outcome.response_text,
    )
    return sample


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _grouped(samples: list[dict], key: str, value: str = "score") -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        groups[str(sample.get(key) or "unknown")].append(sample[value])
    return dict(sorted(groups.items()))


def benchmark_metrics(benchmark: str, samples: list[dict]) -> dict[str, float | int | None]:
    """The benchmark's official metrics from scored samples (`score_outcome`)."""
    scores = [s["score"] for s in samples]
    metrics: dict[str, float | int | None] = {}
    if benchmark == "heldout":
        metrics["accuracy"] = _mean(scores)
    elif benchmark == "vstar":
        metrics["accuracy"] = _mean(scores)
        for category, values in _grouped(samples, "category").items():
            metrics[f"accuracy/{category}"] = _mean(values)
            metrics[f"n/{category}"] = len(values)
    elif benchmark == "tallyqa":
        metrics["accuracy"] = _mean(scores)
        for subset in ("complex", "simple"):
            values = [s["score"] for s in samples if s.get("subset") == subset]
            metrics[f"accuracy/{subset}"] = _mean(values)
            metrics[f"n/{subset}"] = len(values)
    elif benchmark == "infovqa":
        metrics["anls"] = _mean(scores)
        metrics["exact_match"] = _mean([s["exact_match"] for s in samples])
    elif benchmark == "mvbench":
        metrics["accuracy"] = _mean(scores)
        tasks = _grouped(samples, "task")
        metrics["accuracy_task_mean"] = _mean([_mean(values) for values in tasks.values()])
        for task, values in tasks.items():
            metrics[f"accuracy/{task}"] = _mean(values)
            metrics[f"n/{task}"] = len(values)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    return metrics


def trace_metrics(outcomes: Sequence[EvalOutcome], samples: list[dict]) -> dict[str, float | int | None]:
    """RaPR and tool statistics over the evaluated samples (one greedy sample per question)."""
    operations = sum(o.num_visual_operations for o in outcomes)
    failed = sum(o.num_failed_operations for o in outcomes)
    used = [s["score"] for o, s in zip(outcomes, samples) if o.num_visual_operations > 0]
    unused = [s["score"] for o, s in zip(outcomes, samples) if o.num_visual_operations == 0]
    metrics: dict[str, float | int | None] = {
        "answered_rate": _mean([float(s["prediction"] is not None) for s in samples]),
        "rapr": _mean([float(o.num_visual_operations > 0) for o in outcomes]),
        "tool_calls_per_sample": _mean([float(o.num_visual_operations) for o in outcomes]),
        "tool_error_rate": failed / operations if operations else None,
        "tool_failed_sample_rate": _mean([float(o.num_failed_operations > 0) for o in outcomes]),
        "truncated_rate": _mean([float(o.finish_reason in TRUNCATED_FINISH_REASONS) for o in outcomes]),
        "response_tokens_mean": _mean([float(o.response_tokens) for o in outcomes]),
        "score_with_tools": _mean(used),
        "score_without_tools": _mean(unused),
    }
    kinds = Counter(kind for o in outcomes for kind in o.error_kinds)
    metrics.update({f"tool_errors/{kind}": count for kind, count in sorted(kinds.items())})
    tools = Counter(op.get("name") or "unparsed" for o in outcomes for op in o.operations)
    metrics.update({f"tool_calls/{name}": count for name, count in sorted(tools.items())})
    return metrics


def summarize(benchmark: str, outcomes: Sequence[EvalOutcome]) -> dict[str, Any]:
    """{"benchmark", "n", "primary_metric", "metrics": {...}, "samples": [...]} for one evaluation.

    Raises ValueError for no outcomes or an outcome of another benchmark."""
    if not outcomes:
        raise ValueError("no outcomes to score")
    for outcome in outcomes:
        if outcome.record.benchmark != benchmark:
            raise ValueError(f"{outcome.record.qid} belongs to {outcome.record.benchmark}, not {benchmark}")
    samples = [score_outcome(o) for o in outcomes]
    metrics: dict[str, float | int | None] = {"n": len(samples)}
    metrics.update(benchmark_metrics(benchmark, samples))
    metrics.update(trace_metrics(outcomes, samples))
    primary = PRIMARY_METRIC[benchmark]
    if metrics.get(primary) is None:  # e.g. TallyQA without subset labels: no complex accuracy
        primary = "accuracy"
    return {"benchmark": benchmark, "n": len(samples), "primary_metric": primary, "metrics": metrics,
            "samples": samples}


def format_table(summary: dict[str, Any]) -> str:
    """The metrics as a two-column text table, the primary metric first."""
    metrics = summary["metrics"]
    primary = summary["primary_metric"]
    names = [primary, *(name for name in metrics if name != primary)]
    width = max(len(name) for name in names)
    lines = [f"{summary['benchmark']}: {summary['n']} questions", f"{'metric':<{width}}  value", "-" * (width + 12)]
    for name in names:
        value = metrics[name]
        if value is None:
            shown = "n/a"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)
