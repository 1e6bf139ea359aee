"""Evaluation sets of V*, TallyQA, InfoVQA and MVBench as one record type (`EvalRecord`).

Pure: no Ray, no model, and no media is decoded (only paths are resolved; `video_source` opens a
video's container when asked). Two families of formats per benchmark:

1. The Pixel Reasoner eval parquet (JasperHaozhe/{VStar,TallyQA,InfoVQA,MVBench}-EvalData-
   PixelReasoner): `qid`, `question` (choices already written in), `answer` (a string; a list for
   InfoVQA), `image` (a path or a list of paths, relative to the parquet's folder; a video file or
   its frames when `is_video`), `is_video`. Extra columns are kept as metadata; `category`
   (V*), `issimple` (TallyQA) and `task` (MVBench) are read when present.

2. Each benchmark's original release:
   - V* (HF craigwu/vstar_bench): `test_questions.jsonl`, one object per line
     `{"image": "direct_attributes/sa_4690.jpg", "text": question with "(A) ..." options written
     in, "category": "direct_attributes" | "relative_position", "question_id": 0, "label": "A"}`.
     `--data` is that file or its folder. A JSON list of objects with `image`, `question`,
     `options` (list, lettered A, B, ...) and `answer` (letter or option text) or `label`, and an
     optional `category`, is read too. (The per-image annotation JSONs of the V* repository, whose
     first option is always the correct one, are not read.)
   - TallyQA (test.json): a JSON list of `{"image": "VG_100K/2.jpg", "question", "answer": int,
     "issimple": bool, "question_id", "image_id", "data_source"}`; complex = not issimple.
   - InfographicsVQA (infographicsVQA_val_v1.0_withQT.json): `{"data": [{"questionId", "question",
     "image_local_name", "answers": [...], "answer_type", "evidence", "operation/reasoning"}, ...]}`;
     images under the media root, or its `infographicsvqa_images/` folder.
   - MVBench (HF OpenGVLab/MVBench): `json/<task>.json`, lists of `{"video", "question",
     "candidates", "answer"}` (optionally `start`/`end` in seconds: the clip to watch). Candidates
     are lettered A, B, C, ... in order and the answer text is mapped to its letter. Videos are
     found under the video root (`<data>/video` by default) in the task's official folder (e.g.
     `clevrer/video_validation/` for moving_direction; `data0613/<folder>/` too), else directly.

Questions of original formats are written the way the eval parquets are: options inline as
"(A) text" lines, plus a one-line answer-format instruction (the system prompt asks for
`\\boxed{}`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.data import PromptRecord
from rewards.accuracy import AnswerType, parse_choices

BENCHMARKS = ("vstar", "tallyqa", "infovqa", "mvbench")

# The verifier of each benchmark (rewards.accuracy): InfoVQA's official metric is ANLS.
BENCHMARK_ANSWER_TYPES: dict[str, AnswerType] = {
    "vstar": "multiple_choice",
    "tallyqa": "count",
    "infovqa": "anls",
    "mvbench": "multiple_choice",
}

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")

MC_INSTRUCTION = "Answer with the option's letter from the given choices."
COUNT_INSTRUCTION = "Answer with a single number."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."

# MVBench task (json file stem) -> (folder under the video root, media kind, uses start/end),
# as in the official evaluation's data_list. "frame" tasks name a folder of frame images.
MVBENCH_TASKS: dict[str, tuple[str, str, bool]] = {
    "action_sequence": ("star/Charades_v1_480", "video", True),
    "action_prediction": ("star/Charades_v1_480", "video", True),
    "action_antonym": ("ssv2_video", "video", False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("FunQA_test/test", "video", False),
    "object_existence": ("clevrer/video_validation", "video", False),
    "object_interaction": ("star/Charades_v1_480", "video", True),
    "object_shuffle": ("perception/videos", "video", False),
    "moving_direction": ("clevrer/video_validation", "video", False),
    "action_localization": ("sta/sta_video", "video", True),
    "scene_transition": ("scene_qa/video", "video", False),
    "action_count": ("perception/videos", "video", False),
    "moving_count": ("clevrer/video_validation", "video", False),
    "moving_attribute": ("clevrer/video_validation", "video", False),
    "state_change": ("perception/videos", "video", False),
    "fine_grained_pose": ("nturgbd", "video", False),
    "character_order": ("perception/videos", "video", False),
    "egocentric_navigation": ("vlnqa", "video", False),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "frame", True),
    "counterfactual_inference": ("clevrer/video_validation", "video", False),
}
MVBENCH_EXTRA_VIDEO_FOLDER = "data0613"  # files added to the HF release later live under this folder too
EPISODIC_REASONING_FPS = 3.0  # tvqa/frames_fps3_hq: frames extracted at 3 per second

_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".gif")


class EvalDataError(ValueError):
    """An evaluation file that cannot be read as the benchmark's format; the message says why."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation question.

    question: the text shown to the model, options written in. golds: every accepted answer (an
    option letter for multiple choice; InfoVQA's several answers). answer_type: the verifier
    (`rewards.accuracy.score_answer`). choices: {"A": option text, ...} for multiple choice.
    category: V* category; task: MVBench task; subset: TallyQA "simple" / "complex" (None: unknown).
    """

    qid: str
    benchmark: str
    question: str
    media_paths: tuple[str, ...]  # absolute; a video file, a folder of frames, or images
    is_video: bool
    golds: tuple[str, ...]
    answer_type: AnswerType
    choices: dict[str, str] | None = field(default=None, compare=False)
    category: str | None = None
    task: str | None = None
    subset: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_prompt_record(self) -> PromptRecord:
        """The record as the RL pipeline's PromptRecord (answer_type / choices in its metadata, which
        `rewards.group.record_answer_spec` reads)."""
        metadata = {**self.metadata, "answer_type": self.answer_type, "benchmark": self.benchmark}
        if self.choices:
            metadata["choices"] = dict(self.choices)
        for name in ("category", "task", "subset"):
            if getattr(self, name) is not None:
                metadata[name] = getattr(self, name)
        return PromptRecord(self.qid, self.question, self.media_paths, self.is_video, self.golds, metadata)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_eval_set(
    benchmark: str, path: str | os.PathLike, media_root: str | os.PathLike | None = None, limit: int | None = None
) -> list[EvalRecord]:
    """Records of `benchmark` from `path`, in file order (the first `limit` when given).

    A `.parquet` file (or a folder holding exactly one) is read as the Pixel Reasoner eval format;
    anything else as the benchmark's original format. `media_root`: where relative media paths
    start (default: the data file's folder; MVBench: `<data>/video` if it exists). Raises
    FileNotFoundError for a missing path and EvalDataError for a malformed file.
    """
    if benchmark not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    if limit is not None and limit < 1:
        raise EvalDataError(f"limit must be at least 1, got {limit}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    parquet = _parquet_in(path)
    if parquet is not None:
        records = read_eval_parquet(parquet, benchmark, media_root)
    elif benchmark == "vstar":
        records = read_vstar(path, media_root)
    elif benchmark == "tallyqa":
        records = read_tallyqa(path, media_root)
    elif benchmark == "infovqa":
        records = read_infovqa(path, media_root)
    else:
        records = read_mvbench(path, media_root)
    if not records:
        raise EvalDataError(f"{path} holds no {benchmark} questions")
    return records[:limit] if limit else records


def _parquet_in(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".parquet" else None
    found = sorted(path.glob("*.parquet"))
    if len(found) > 1:
        raise EvalDataError(f"{path} holds several parquet files ({[p.name for p in found]}): name one")
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# Pixel Reasoner eval parquet
# --------------------------------------------------------------------------------------------

_PARQUET_COLUMNS = ("question", "answer", "image", "is_video")


def read_eval_parquet(path: str | os.PathLike, benchmark: str, media_root: str | os.PathLike | None = None) -> list[EvalRecord]:
    """The Pixel Reasoner eval parquet of `benchmark` (see the module docstring)."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = pq.read_table(path)
    missing = [c for c in _PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise EvalDataError(f"{path} lacks columns {missing} of the Pixel Reasoner eval format (has {table.column_names})")
    root = Path(media_root) if media_root else path.parent
    answer_type = BENCHMARK_ANSWER_TYPES[benchmark]
    records = []
    for index, row in enumerate(table.to_pylist()):
        where = f"{path} row {index}"
        qid = str(row.get("qid") if row.get("qid") is not None else f"{benchmark}-{index}")
        question = _text(row["question"], f"{where}: question")
        golds = _golds(row["answer"], where)
        media = _media_list(row["image"], where)
        is_video = bool(row["is_video"])
        extra = {k: v for k, v in row.items() if k not in (*_PARQUET_COLUMNS, "qid")}
        choices = None
        if answer_type == "multiple_choice":
            choices = parse_choices(question)
            if not choices:
                raise EvalDataError(f"{where}: no '(A) ...' options in the question of a multiple-choice benchmark")
        category = task = subset = None
        if benchmark == "vstar":
            category = _optional_str(extra.get("category")) or _vstar_category_of(media[0])
        elif benchmark == "mvbench":
            task = next((str(extra[k]) for k in ("task", "task_type", "category") if extra.get(k)), None)
        elif benchmark == "tallyqa" and extra.get("issimple") is not None:
            subset = "simple" if extra["issimple"] else "complex"
        records.append(EvalRecord(
            qid=qid, benchmark=benchmark, question=question,
            media_paths=tuple(_resolve(root, m) for m in media), is_video=is_video, golds=golds,
            answer_type=answer_type, choices=choices, category=category, task=task, subset=subset,
            metadata={**extra, "source_format": "pixel_reasoner_parquet"},
        ))
    return records


def _golds(answer: Any, where: str) -> tuple[str, ...]:
    answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    golds = tuple(str(a).strip() for a in answers if a is not None and str(a).strip())
    if not golds:
        raise EvalDataError(f"{where}: no gold answer (answer={answer!r})")
    return golds


def _media_list(image: Any, where: str) -> list[str]:
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    paths = []
    for item in items:
        if isinstance(item, Mapping):  # an HF Image struct {"bytes", "path"}
            item = item.get("path")
        if not isinstance(item, str) or not item:
            raise EvalDataError(f"{where}: `image` must be a path or a list of paths (embedded image bytes are not "
                                f"supported: extract them to files), got {type(item).__name__}")
        paths.append(item)
    if not paths:
        raise EvalDataError(f"{where}: no image")
    return paths


def _vstar_category_of(media_path: str) -> str | None:
    """V* images live in a folder named after their category (direct_attributes/sa_4690.jpg)."""
    parts = Path(media_path).parts
    return next((c for c in VSTAR_CATEGORIES if c in parts), None)


# --------------------------------------------------------------------------------------------
# V*
# --------------------------------------------------------------------------------------------

VSTAR_QUESTIONS_FILE = "test_questions.jsonl"


def read_vstar(path: str | os.PathLike, media_root: str | os.PathLike | None = None) -> list[EvalRecord]:
    """V*: `test_questions.jsonl` (the file or its folder), or a JSON list with explicit options."""
    path = Path(path)
    if path.is_dir():
        if not (path / VSTAR_QUESTIONS_FILE).exists():
            raise EvalDataError(f"{path} has no {VSTAR_QUESTIONS_FILE} (V* bench layout: {VSTAR_QUESTIONS_FILE} "
                                "beside the direct_attributes/ and relative_position/ image folders)")
        path = path / VSTAR_QUESTIONS_FILE
    root = Path(media_root) if media_root else path.parent
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_json_list(path, "V*")
    records = []
    for index, row in enumerate(rows):
        where = f"{path} item {index}"
        image = _text(_first_of(row, ("image", "image_path"), where), f"{where}: image")
        if "options" in row:
            choices = _lettered(row["options"], where)
            question = _with_options(_text(_first_of(row, ("question", "text"), where), where), choices, MC_INSTRUCTION)
        else:
            question = _text(_first_of(row, ("text", "question"), where), f"{where}: text")
            choices = parse_choices(question)
            if not choices:
                raise EvalDataError(f"{where}: no options: expected `options` or '(A) ...' options in the text")
        gold = _gold_letter(_first_of(row, ("label", "answer"), where), choices, where)
        category = _optional_str(row.get("category")) or _vstar_category_of(image)
        qid = row.get("question_id", row.get("qid"))
        records.append(EvalRecord(
            qid=f"vstar-{qid if qid is not None else index}", benchmark="vstar", question=question,
            media_paths=(_resolve(root, image),), is_video=False, golds=(gold,), answer_type="multiple_choice",
            choices=choices, category=category, metadata={"source_format": "vstar", "image": image},
        ))
    return records


def _lettered(options: Any, where: str) -> dict[str, str]:
    """{"A": first option, ...} from a list of option texts (or an explicit letter -> text map)."""
    if isinstance(options, Mapping):
        choices = {str(letter).strip().strip("()").upper(): str(text).strip() for letter, text in options.items()}
    elif isinstance(options, (list, tuple)):
        choices = {chr(ord("A") + offset): str(text).strip() for offset, text in enumerate(options)}
    else:
        raise EvalDataError(f"{where}: options must be a list of texts, got {type(options).__name__}")
    expected = [chr(ord("A") + offset) for offset in range(len(choices))]
    if len(choices) < 2 or sorted(choices) != expected or len(choices) > 26:
        raise EvalDataError(f"{where}: expected 2 to 26 options lettered A, B, C, ..., got {options!r}")
    return {letter: choices[letter] for letter in expected}


def _gold_letter(answer: Any, choices: Mapping[str, str], where: str) -> str:
    """The gold option's letter, from a letter ("B", "(B)", "b") or the option's exact text."""
    text = str(answer).strip()
    letter = text.strip("()[]. ").upper()
    if len(letter) == 1 and letter in choices:
        return letter
    matching = [k for k, option in choices.items() if option.strip() == text]
    if len(matching) == 1:
        return matching[0]
    raise EvalDataError(f"{where}: answer {answer!r} is neither an option letter nor exactly one option's text "
                        f"(options: {dict(choices)})")


def _with_options(question: str, choices: Mapping[str, str], instruction: str, mvbench_style: bool = False) -> str:
    """The question, its options as "(A) text" lines, the instruction. MVBench's official template
    writes "Question: ..." and "Options:" around them."""
    lines = [f"Question: {question.strip()}", "Options:"] if mvbench_style else [question.strip()]
    lines += [f"({letter}) {text}" for letter, text in choices.items()]
    lines.append(instruction)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# TallyQA
# --------------------------------------------------------------------------------------------


def read_tallyqa(path: str | os.PathLike, media_root: str | os.PathLike | None = None) -> list[EvalRecord]:
    """TallyQA's test.json: the complex subset is `issimple == false`."""
    path = Path(path)
    root = Path(media_root) if media_root else path.parent
    records = []
    for index, row in enumerate(_read_json_list(path, "TallyQA")):
        where = f"{path} item {index}"
        image = _text(_first_of(row, ("image",), where), f"{where}: image")
        answer = _first_of(row, ("answer",), where)
        if isinstance(answer, bool) or not (isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit())):
            raise EvalDataError(f"{where}: answer must be a whole number, got {answer!r}")
        issimple = row.get("issimple")
        subset = None if issimple is None else ("simple" if issimple else "complex")
        qid = row.get("question_id", row.get("qid"))
        records.append(EvalRecord(
            qid=f"tallyqa-{qid if qid is not None else index}", benchmark="tallyqa",
            question=f"{_text(row.get('question'), f'{where}: question').strip()}\n{COUNT_INSTRUCTION}",
            media_paths=(_resolve(root, image),), is_video=False, golds=(str(int(answer)),), answer_type="count",
            subset=subset,
            metadata={"source_format": "tallyqa", "image": image,
                      **{k: row[k] for k in ("image_id", "data_source") if k in row}},
        ))
    return records


# --------------------------------------------------------------------------------------------
# InfographicsVQA
# --------------------------------------------------------------------------------------------

INFOVQA_IMAGE_FOLDERS = ("infographicsvqa_images", "images")


def read_infovqa(path: str | os.PathLike, media_root: str | os.PathLike | None = None) -> list[EvalRecord]:
    """InfographicsVQA's `{"data": [...]}` file (val with answers; the test split has none)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path} is not JSON: {error}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("data"), list):
        raise EvalDataError(f'{path}: expected an InfographicsVQA file {{"data": [...]}}')
    root = Path(media_root) if media_root else path.parent
    records = []
    for index, row in enumerate(document["data"]):
        where = f"{path} data[{index}]"
        if not isinstance(row, Mapping):
            raise EvalDataError(f"{where}: expected an object")
        if not row.get("answers"):
            raise EvalDataError(f"{where}: no `answers` (the test split has none: it cannot be scored locally)")
        image = _text(_first_of(row, ("image_local_name",), where), f"{where}: image_local_name")
        qid = row.get("questionId", index)
        metadata = {"source_format": "infovqa", "image": image}
        for key, name in (("answer_type", "infovqa_answer_type"), ("evidence", "evidence"),
                          ("operation/reasoning", "operation/reasoning")):
            if key in row:
                metadata[name] = row[key]
        records.append(EvalRecord(
            qid=f"infovqa-{qid}", benchmark="infovqa",
            question=f"{_text(row.get('question'), f'{where}: question').strip()}\n{SHORT_ANSWER_INSTRUCTION}",
            media_paths=(_resolve(root, image, INFOVQA_IMAGE_FOLDERS),), is_video=False,
            golds=_golds(row["answers"], where), answer_type="anls", metadata=metadata,
        ))
    return records


# --------------------------------------------------------------------------------------------
# MVBench
# --------------------------------------------------------------------------------------------


def read_mvbench(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[EvalRecord]:
    """MVBench: `path` is the release's root (with `json/`), its `json/` folder, or one task file.

    Tasks are read in file-name order. Every video is resolved under `video_root` (default
    `<root>/video` if it exists, else the root): the task's official folder, then its `data0613/`
    copy, then `video_root/<video>` itself; the official folder's path when none exists.
    """
    path = Path(path)
    if path.is_file():
        task_files, root = [path], path.parent.parent if path.parent.name == "json" else path.parent
    else:
        json_dir = path / "json" if (path / "json").is_dir() else path
        task_files = sorted(json_dir.glob("*.json"))
        root = json_dir.parent if json_dir.name == "json" else json_dir
        if not task_files:
            raise EvalDataError(f"{path}: no MVBench task files (expected json/<task>.json)")
    if video_root is None:
        video_root = root / "video" if (root / "video").is_dir() else root
    video_root = Path(video_root)
    records = []
    for task_file in task_files:
        task = task_file.stem
        folder, kind, uses_bound = MVBENCH_TASKS.get(task, (None, "video", False))
        for index, row in enumerate(_read_json_list(task_file, "MVBench")):
            where = f"{task_file} item {index}"
            video = _text(_first_of(row, ("video",), where), f"{where}: video")
            candidates = _first_of(row, ("candidates",), where)
            choices = _lettered(candidates, where)
            gold = _gold_letter(_first_of(row, ("answer",), where), choices, where)
            question = _text(row.get("question"), f"{where}: question")
            metadata: dict[str, Any] = {"source_format": "mvbench", "video": video, "media_kind": kind}
            if "start" in row and "end" in row and (uses_bound or folder is None):
                metadata["bound"] = (float(row["start"]), float(row["end"]))
            if kind == "frame":
                metadata["fps"] = EPISODIC_REASONING_FPS
            records.append(EvalRecord(
                qid=f"mvbench-{task}-{index}", benchmark="mvbench",
                question=_with_options(question, choices, MC_INSTRUCTION, mvbench_style=True),
                media_paths=(_resolve_video(video_root, folder, video),), is_video=True, golds=(gold,),
                answer_type="multiple_choice", choices=choices, task=task, metadata=metadata,
            ))
    return records


def _resolve_video(video_root: Path, folder: str | None, video: str) -> str:
    candidates = []
    if folder:
        candidates += [video_root / folder / video, video_root / MVBENCH_EXTRA_VIDEO_FOLDER / folder / video]
    candidates.append(video_root / video)
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    return str(candidates[0].resolve())


def video_source(record: EvalRecord, num_frames: int = 16):
    """The `policies.visual_ops.VideoSource` of a video record: `num_frames` indices spread evenly
    over the clip (MVBench's `start`/`end` seconds when given, else the whole video).

    A video file is opened (decord reads the container's index; no frame is decoded). A video given
    as its frames (MVBench's frame folders, e.g. episodic_reasoning at 3 fps; or a parquet row
    listing frame files) becomes a VideoSource over the frame files in name order. Raises
    ValueError for a record that is not a video."""
    from policies.visual_ops import VideoSource, _video_reader, sample_frame_indices

    if not record.is_video or not record.media_paths:
        raise ValueError(f"{record.qid} is not a video question")
    bound = record.metadata.get("bound")
    frame_files = _frame_files(record)
    if frame_files is not None:
        total, fps, video = len(frame_files), float(record.metadata.get("fps") or 0.0), frame_files
        if not total:
            raise ValueError(f"{record.qid}: the frame folder {record.media_paths[0]} holds no images")
    else:
        with _video_reader(record.media_paths[0]) as reader:
            total, fps = len(reader), float(reader.get_avg_fps())
        video = record.media_paths[0]
    if not bound or fps <= 0:
        return VideoSource(video, sample_frame_indices(total, num_frames))
    first = min(total - 1, max(0, round(bound[0] * fps)))
    last = min(total - 1, max(first, round(bound[1] * fps)))
    return VideoSource(video, tuple(first + i for i in sample_frame_indices(last - first + 1, num_frames)))


def load_image_array(path: str):
    """The full-resolution image as an HxWx3 uint8 array (what the tools crop from)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_video_source(record, num_frames: int):
    """The `VideoSource` of a video record (an EvalRecord or a training PromptRecord) with its media
    as encoded bytes, to put in the object store like an image: the file of a video, or only the N
    sampled files of a video given as frames."""
    from policies.visual_ops import VideoSource

    source = video_source(record, num_frames)
    if isinstance(source.video, tuple):
        wanted = sorted(set(source.frame_indices))
        position = {index: k for k, index in enumerate(wanted)}
        return VideoSource(tuple(Path(source.video[i]).read_bytes() for i in wanted),
                           tuple(position[i] for i in source.frame_indices))
    return VideoSource(Path(source.video).read_bytes(), source.frame_indices)


_FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _frame_files(record: EvalRecord) -> tuple[str, ...] | None:
    """The record's frame files, or None when its media is one video file."""
    if len(record.media_paths) > 1:
        return tuple(record.media_paths)
    path = Path(record.media_paths[0])
    if record.metadata.get("media_kind") == "frame" or path.is_dir():
        return tuple(str(f) for f in sorted(path.iterdir()) if f.suffix.lower() in _FRAME_SUFFIXES)
    if path.suffix.lower() in _FRAME_SUFFIXES:  # a single frame
        return (str(path),)
    return None


def is_video_path(path: str) -> bool:
    return Path(path).suffix.lower() in _VIDEO_SUFFIXES


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _read_json_list(path: Path, name: str) -> list[Mapping[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path} is not JSON: {error}") from None
    if isinstance(rows, Mapping) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise EvalDataError(f"{path}: expected a JSON list of {name} question objects")
    return rows


def _read_jsonl(path: Path) -> list[Mapping[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path} line {number} is not JSON: {error}") from None
        if not isinstance(row, Mapping):
            raise EvalDataError(f"{path} line {number}: expected an object")
        rows.append(row)
    return rows


def _first_of(row: Mapping[str, Any], keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    raise EvalDataError(f"{where}: missing field {' / '.join(repr(k) for k in keys)} (has {sorted(row)})")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _optional_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _resolve(root: Path, relative: str, extra_folders: Iterable[str] = ()) -> str:
    """`relative` under `root` (absolute paths kept); the first of `root/<folder>/relative` that
    exists when `root/relative` does not."""
    candidate = root / relative
    if not candidate.exists():
        for folder in extra_folders:
            if (root / folder / relative).exists():
                candidate = root / folder / relative
                break
    return str(candidate.resolve())
