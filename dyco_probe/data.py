"""Examples and the VLM-R1 jsonl format.

One line per example::

    {"id": "...", "image": "img.png" or ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image> question"}, {"from": "gpt", "value": "answer"}]}

Image paths are relative to the jsonl file's folder. dyco_probe's synthetic exports add optional keys
(``"completion"``: the gold chain of thought; ``"synthetic"``: the scene, to rebuild ground-truth roles);
other readers ignore them, and this reader accepts files without them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dyco_probe.models.adapters import IMAGE_TAG


class DataError(ValueError):
    """A bad example: the message names the file, line and problem."""


@dataclass
class Example:
    """One question about one or more images, with its reference answer.

    ``images`` holds PIL images or paths (opened lazily by :meth:`load_images`). ``problem`` is the
    synthetic task's ground truth when the example comes from it, else ``None``.
    """

    id: str
    question: str  # with one <image> tag per image
    answer: str
    images: list = field(default_factory=list)
    completion: str | None = None
    problem: object | None = None
    source: str = ""

    def load_images(self):
        from PIL import Image

        out = []
        for im in self.images:
            if isinstance(im, (str, Path)):
                try:
                    with Image.open(im) as f:
                        out.append(f.convert("RGB"))
                except OSError as e:
                    raise DataError(f"{self.source or self.id}: cannot open image {im}: {e}") from e
            else:
                out.append(im)
        return out


def example_from_problem(problem) -> Example:
    """Wrap a synthetic :class:`~dyco_probe.task.problems.Problem` as an :class:`Example`."""
    return Example(
        id=problem.id,
        question=f"{IMAGE_TAG} {problem.question}",
        answer=problem.answer,
        images=[problem.render()],
        completion=problem.completion,
        problem=problem,
    )


def synthetic_examples(split: str, n: int, config=None, start: int = 0) -> list[Example]:
    """``n`` examples of a fixed split of the synthetic task (default difficulty unless ``config``)."""
    from dyco_probe.task.problems import TaskConfig, make_split

    return [example_from_problem(p) for p in make_split(split, n, config or TaskConfig(), start=start)]


def _problem_record(problem) -> dict:
    return {
        "seed": problem.seed,
        "config": problem.config.to_dict(),
    }


def write_jsonl(examples: Iterable[Example], path: str | Path, image_dir: str | None = None) -> Path:
    """Export examples in VLM-R1 jsonl format, images as PNG next to it (in ``image_dir``, default
    ``<stem>_images``). Returns the jsonl path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img_dir = path.parent / (image_dir or f"{path.stem}_images")
    img_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ex in examples:
            names = []
            for k, im in enumerate(ex.load_images()):
                name = f"{ex.id}_{k}.png" if len(ex.images) > 1 else f"{ex.id}.png"
                im.save(img_dir / name)
                names.append(f"{img_dir.name}/{name}")
            record = {
                "id": ex.id,
                "image": names[0] if len(names) == 1 else names,
                "conversations": [
                    {"from": "human", "value": ex.question},
                    {"from": "gpt", "value": ex.answer},
                ],
            }
            if ex.completion is not None:
                record["completion"] = ex.completion
            if ex.problem is not None:
                record["synthetic"] = _problem_record(ex.problem)
            f.write(json.dumps(record) + "\n")
    return path


def _parse_line(line: str, where: str, base: Path) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    images = record.get("image")
    if images is None:
        raise DataError(f"{where}: no 'image' field")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images) or not images:
        raise DataError(f"{where}: 'image' must be a path or a non-empty list of paths")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    human = next((c.get("value") for c in conv if isinstance(c, dict) and c.get("from") == "human"), None)
    gpt = next((c.get("value") for c in conv if isinstance(c, dict) and c.get("from") == "gpt"), None)
    if not isinstance(human, str):
        raise DataError(f"{where}: no human turn in 'conversations'")
    if gpt is None:
        raise DataError(f"{where}: no gpt turn (the reference answer) in 'conversations'")
    n_tags = human.count(IMAGE_TAG)
    if n_tags == 0:
        raise DataError(f"{where}: the human turn has no {IMAGE_TAG} tag")
    if n_tags != len(images):
        raise DataError(f"{where}: {n_tags} {IMAGE_TAG} tags but {len(images)} images")
    paths = []
    for p in images:
        full = (base / p) if not Path(p).is_absolute() else Path(p)
        if not full.exists():
            raise DataError(f"{where}: image file {full} does not exist")
        paths.append(full)
    problem = None
    if isinstance(record.get("synthetic"), dict):
        from dyco_probe.task.problems import TaskConfig, generate_problem

        syn = record["synthetic"]
        try:
            problem = generate_problem(
                int(syn["seed"]), TaskConfig.from_dict(syn["config"]), str(record.get("id"))
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: bad 'synthetic' record: {e}") from e
    return Example(
        id=str(record.get("id", where)),
        question=human,
        answer=str(gpt),
        images=paths,
        completion=record.get("completion"),
        problem=problem,
        source=where,
    )


def read_jsonl(path: str | Path, *, skip_bad: bool = False) -> list[Example]:
    """Read a VLM-R1 jsonl file.

    A bad line (bad JSON, missing image file, no ``<image>`` tag, ...) raises :class:`DataError` naming
    the file and line; with ``skip_bad=True`` bad lines are skipped and reported in one warning
    (the skipped lines are also available as ``read_jsonl.last_skipped``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    examples, skipped = [], []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                examples.append(_parse_line(line, where, path.parent))
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
    read_jsonl.last_skipped = skipped
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} bad line(s) of {path}:\n  " + "\n  ".join(skipped), stacklevel=2
        )
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


read_jsonl.last_skipped = []
