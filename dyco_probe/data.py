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


def check_image(path, where: str = "") -> None:
    """Raise `DataError` unless `path` is an image file PIL can read in full.

    Cheap: the header is parsed and the file's structure checked (`Image.verify`: for PNG every
    chunk and its checksum). `verify` does not read JPEG data, so JPEGs are also decoded, at 1/8
    scale (`Image.draft`), which finds truncated files.
    """
    from PIL import Image

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8))) is not None:
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file; all mean unreadable
        raise DataError(f"{prefix}image file {path} is not a readable image ({type(e).__name__}: {e})") from e


def _parse_line(line: str, where: str, base: Path, verify_images: bool = True) -> Example:
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
        if verify_images:
            check_image(full, where)
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


def read_jsonl(
    path: str | Path,
    *,
    skip_bad: bool = False,
    skipped: list | None = None,
    verify_images: bool = True,
) -> list[Example]:
    """Read a VLM-R1 jsonl file, checking every line before any of it is used.

    A bad line (bad JSON, missing or unreadable image file, no ``<image>`` tag, ...) raises
    :class:`DataError` naming the file and line. With ``skip_bad=True`` bad lines are skipped: their
    messages are appended to ``skipped`` when given (else reported in one warning) and kept in
    ``read_jsonl.last_skipped``.

    Args:
        path: the jsonl file; image paths are relative to its folder.
        skip_bad: skip bad lines instead of raising.
        skipped: a list that receives one message (``file:line: problem``) per skipped line.
        verify_images: open and check every image now (``check_image``), so that a corrupt image is
            a bad line like any other and not a failure in the middle of a run.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    examples, bad = [], []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                examples.append(_parse_line(line, where, path.parent, verify_images))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
    read_jsonl.last_skipped = bad
    if skipped is not None:
        skipped.extend(bad)
    elif bad:
        warnings.warn(f"skipped {len(bad)} bad line(s) of {path}:\n  " + "\n  ".join(bad), stacklevel=2)
    if not examples:
        raise DataError(f"{path}: no usable examples" + (f" ({len(bad)} bad lines skipped)" if bad else ""))
    return examples


read_jsonl.last_skipped = []
