"""Held-out evaluation inside an RL run: the eval split rolled out greedily, once per question,
through the run's own rollout workers (current weights, same tools and budgets), scored by each
record's verifier; accuracy, RaPR and tool statistics come back as `eval/*` metrics."""
from __future__ import annotations

from cluster.config import PixelRayConfig
from cluster.eval_data import EvalRecord
from cluster.eval_metrics import summarize
from policies.data import PromptRecord


def heldout_records(config: PixelRayConfig, cache_dir) -> list[EvalRecord]:
    """The run's held-out questions: `data.eval_path`, else the built-in synthetic task's eval split
    (empty if it has none), cut to `eval_size`."""
    from policies.data import read_rl_parquet
    from policies.synthetic import ensure_synthetic_zoom

    path = config.data.eval_path
    if path is None and config.data.train_path is None:
        path = ensure_synthetic_zoom(config.data.synthetic, cache_dir).get("eval")
    records = read_rl_parquet(path) if path else []
    return [as_eval_record(r, config.reward.answer_type) for r in records[:config.eval_size]]


def as_eval_record(record: PromptRecord, default_answer_type: str) -> EvalRecord:
    metadata = dict(record.metadata)
    return EvalRecord(
        qid=record.qid, benchmark="heldout", question=record.question, media_paths=record.media_paths,
        is_video=record.is_video, golds=record.answers,
        answer_type=metadata.pop("answer_type", None) or default_answer_type,
        choices=metadata.pop("choices", None), metadata=metadata,
    )


def evaluate_heldout(ray, workers: list, records: list[EvalRecord], batch_size: int,
                     num_frames: int = 16) -> dict[str, float]:
    """`eval/<metric>` for every numeric metric of the held-out rollouts."""
    from cluster.evaluate import roll_out

    outcomes, totals = roll_out(ray, workers, records, batch_size, num_frames)
    metrics = summarize("heldout", outcomes)["metrics"]
    metrics["tokens_per_s"] = totals["tokens_per_s"]
    return {f"eval/{name}": float(value) for name, value in metrics.items() if isinstance(value, (int, float))}
