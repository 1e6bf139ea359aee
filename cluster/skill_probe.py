"""Teacher-forced probes of the two skills the synthetic zoom task needs, for one checkpoint:

- reading: the model is shown a close-up of the square (the perception examples' prompt) and the
  answer text up to "The square is"; its likeliest next option token is its reading; also inside
  a zoom trace, after a crop of the named cell (`reading_after_zoom`), where a warm start trained
  on misdirected traces can answer its prior instead;
- localization (`region_hint` tasks): the model is shown the question and the view, and a zoom
  trace up to the crop's box, then decodes the box greedily. Right if it is the box of the cell
  the question names (what the traces teach); also reported: the share of boxes that hold the
  square at all, and the share where, of the grid's cells' box texts, the named cell's is the
  likeliest (a model can rank the right cell first and still decode another box: a greedy decoder
  commits to one coordinate at a time); and, per named cell, the chance that sampling at
  temperature 1 writes each cell's box (`box_sampled`, rows: the named cell, row-major): how
  often RL's rollouts try the right zoom at all, and where the rest go (a row whose mass sits on
  the cells of one row or column of the grid is a box whose other coordinate ignores the name).

RL needs both: a model that zooms into the wrong cell, or zooms right and misreads, gains nothing
from zooming. Examples are freshly drawn (their own random stream) with uniform answers, so a
prior cannot pass for skill. Greedy held-out accuracy (`cluster.run`'s `eval/*`) says whether the
model does the task; this says which skill is missing when it does not.

    python -m cluster.skill_probe MODEL_PATH [--config zoom-curiosity] [--num 64] [--json FILE] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from statistics import fmean

PROBE_SEED = 977  # the probe's own trace stream (SFT uses the config's seed)
ANSWER_PREFIX = "The square is"  # policies.sft_data.answer_text


class SkillProbe:
    def __init__(self, model_path: str, config):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.config = config
        self.spec = config.data.synthetic.model_copy(update={"prior_fraction": None})
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.image_processor = AutoImageProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def _log_probs(self, token_ids: list[int], images: list):
        """Log-softmax over the vocabulary at every position of one sequence (image pads expanded)."""
        import torch

        from policies.batching import TrainSample, collate

        batch = collate([TrainSample(token_ids, [0] * len(token_ids), [0.0] * len(token_ids), images, 0.0)],
                        self.image_processor, self.image_pad_id, self.tokenizer.pad_token_id)
        with torch.no_grad():
            return self.model(**batch.inputs).logits[0].log_softmax(-1)

    def _traces(self, count: int, **fractions):
        from policies.sft_data import synthetic_zoom_traces

        return synthetic_zoom_traces(self.tokenizer, self.spec, count, self.config.tools.budgets,
                                     seed=PROBE_SEED, **fractions)

    def reading(self, count: int, after_zoom: bool = False) -> dict:
        """Close-ups read right. `after_zoom`: the same inside a zoom trace — the question, the
        view, a crop call of the named cell and its crop, then "The square is" — the reading RL
        relies on (a model can read a bare close-up and still answer a prior after its own crop)."""
        from policies.synthetic import answer_options

        options = answer_options(self.spec)
        first_tokens = {o: self.tokenizer.encode(" " + o, add_special_tokens=False)[0] for o in options}
        if len(set(first_tokens.values())) != len(options):
            raise ValueError("the options' first tokens are not distinct; the reading probe cannot tell them apart")
        prefix = self.tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
        confusion: dict[str, Counter] = defaultdict(Counter)
        for example in self._traces(count, self_correction_fraction=0.0, closeup_fraction=0.0 if after_zoom else 1.0):
            ids = example.token_ids
            end = _last_end(ids, prefix)
            log_probs = self._log_probs(ids[:end], example.images)[-1]
            reading = max(options, key=lambda o: log_probs[first_tokens[o]].item())
            confusion[example.metadata["colour"]][reading] += 1
        right = sum(counts[gold] for gold, counts in confusion.items())
        return {"accuracy": right / count, "count": count,
                "confusion": {gold: dict(confusion[gold]) for gold in options if gold in confusion}}

    def localization(self, count: int) -> dict | None:
        from policies.sft_data import crop_call
        from policies.synthetic import region_box

        if not self.spec.region_hint:
            return None
        cells = [region_box(self.spec, cell) for cell in range(self.spec.grid ** 2)]
        calls = [self.tokenizer.encode(crop_call(box), add_special_tokens=False) for box in cells]
        # the box starts after the bracket: the calls' shared text before it is teacher-forced
        start = 1 + max(i for i in range(_common_prefix(calls)) if self.tokenizer.decode(calls[0][i:i + 1]).endswith("["))
        decoded_right = likeliest_right = holds_square = 0
        sampled: dict[int, list[list[float]]] = defaultdict(list)  # named cell -> P(sampling each cell's box)
        for example in self._traces(count, self_correction_fraction=0.0):
            ids = example.token_ids
            end = _last_end(ids, calls[0][:start])  # the trace's (only) crop call, up to its box
            gold = example.metadata["gold_box"]
            named = next(box for box in cells if _holds(box, gold))
            scores = []
            for call in calls:
                box = call[start:]
                log_probs = self._log_probs(ids[:end] + box, example.images[:1])
                scores.append(sum(log_probs[len(log_probs) - len(box) - 1 + k, t].item() for k, t in enumerate(box)))
            likeliest_right += cells[max(range(len(cells)), key=scores.__getitem__)] == named
            sampled[cells.index(named)].append([math.exp(score) for score in scores])
            decoded = self._greedy_box(ids[:end], example.images[:1])
            if decoded is not None:
                decoded_right += _same_box(decoded, named)
                holds_square += _holds(decoded, gold)
        return {"accuracy": decoded_right / count, "holds_square": holds_square / count,
                "likeliest_cell_accuracy": likeliest_right / count, "count": count, "cells": len(cells),
                "named_box_sampled": fmean(row[cell] for cell, rows in sampled.items() for row in rows),
                "box_sampled": {cell: [fmean(column) for column in zip(*rows)] for cell, rows in sorted(sampled.items())}}

    def _greedy_box(self, prefix: list[int], images: list, max_tokens: int = 24) -> list[float] | None:
        """The box the model writes after `prefix` (which ends where the box's numbers start), by
        greedy decoding up to the closing bracket; None if it writes no four numbers."""
        generated: list[int] = []
        for _ in range(max_tokens):
            generated.append(int(self._log_probs(prefix + generated, images)[-1].argmax()))
            text = self.tokenizer.decode(generated)
            if "]" in text:
                return _parse_box(text.split("]")[0])
        return None


def _last_end(ids: list[int], pattern: list[int]) -> int:
    """The index just past the last occurrence of `pattern` in `ids`."""
    for start in range(len(ids) - len(pattern), -1, -1):
        if ids[start:start + len(pattern)] == pattern:
            return start + len(pattern)
    raise ValueError("the probe's marker is not in the trace")


def _holds(box: list[float], inner: list[float]) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def _parse_box(text: str) -> list[float] | None:
    try:
        numbers = [float(part) for part in text.strip(" [").split(",")]
    except ValueError:
        return None
    return numbers if len(numbers) == 4 else None


def _same_box(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def _common_prefix(sequences: list[list[int]]) -> int:
    length = 0
    while all(len(s) > length and s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def probe(model_path: str, config, count: int = 64) -> dict:
    tool = SkillProbe(model_path, config)
    return {"reading": tool.reading(count), "reading_after_zoom": tool.reading(count, after_zoom=True),
            "localization": tool.localization(count)}


def gate_verdict(result: dict, min_reading: float, box_range: tuple[float, float] | None) -> tuple[str, str]:
    """(verdict, why) of one probe `result` against a skill gate (`sft.skill_gate`): "passed";
    "overshot" when the box share is above the range (more SFT only learns the box better: the
    warm start's zooms would pay from the start, no trap); else "short" (not there yet)."""
    reading = result["reading"]["accuracy"]
    box = result["localization"]["accuracy"] if box_range else None
    if box is not None and box > box_range[1]:
        return "overshot", f"box {box:.0%} above {box_range[1]:.0%}"
    missing = [f"reads {reading:.0%} < {min_reading:.0%}"] if reading < min_reading else []
    if box is not None and box < box_range[0]:
        missing.append(f"box {box:.0%} < {box_range[0]:.0%}")
    if missing:
        return "short", "; ".join(missing)
    return "passed", f"reads {reading:.0%}" + (f", box {box:.0%}" if box is not None else "")


def main(argv: list[str] | None = None) -> dict:
    from cluster.config import load_config

    parser = argparse.ArgumentParser(prog="python -m cluster.skill_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_path")
    parser.add_argument("--config", default="zoom-curiosity", help="preset name or YAML file (the task)")
    parser.add_argument("--num", type=int, default=64, help="examples per probe")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.synthetic.grid=3")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    config = load_config(args.config, args.overrides)
    if config.data.train_path:
        parser.error("the probe needs the built-in synthetic task (data.train_path is set)")
    result = probe(args.model_path, config, args.num)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text, file=sys.stdout)
    return result


if __name__ == "__main__":
    main()
