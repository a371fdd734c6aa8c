"""The synthetic visual-reasoning task: content-keyed look-ups composed with arithmetic.

A scene holds a few objects, each with a shape and a colour that no other object of the scene shares.
The question defines a number for every value of one attribute and names objects by the other
attribute, e.g. (look-ups keyed by shape, values defined on colours)::

    red 3 , green 7 , blue 1 , yellow 5 , purple 2 , cyan 8 . compute triangle + square - circle

and the chain of thought alternates between reading the image and reasoning over earlier text::

    <think> triangle is red ; red = 3 ; square is blue ; blue = 1 ; 3 + 1 = 4 ;
    circle is green ; green = 7 ; 4 - 7 = -3 </think> <answer> -3 </answer>

Every word of a chain of thought has a known role (docs/method.md#token-roles: the ground truth labeller):

- ``visual``: a value read from the image (``red`` in ``triangle is red``); its relevant image token is
  the cell of the named object;
- ``text``: a value derived from earlier text (the key copied from the question, the value copied from
  the question's table, operands, operators and results of the arithmetic, the answer);
- ``neutral``: scaffolding that is the same in every chain (``is``, ``;``, ``=``, the tags).

Attributes are balanced (each scene draws its shapes and colours uniformly without replacement), so
neither a guess without the image nor the scene's majority attribute beats chance.

**Notes** (the positive control). A share ``note_rate`` of the questions carries a note that claims the
value of one queried object, ``. note triangle blue .`` before ``compute``; a share ``false_note_rate``
of the notes is false (it names another value present in the scene). A chain may then answer the
noted look-up in one of two forms, the choice visible as a token before the value:

- ``triangle red``: read from the image (``red`` is visual);
- ``triangle note blue``: cite the note (``note`` is the decision, ``blue`` is copied from the text).

The gold chain always reads. ``teacher_chain`` is the biased teacher the built-in model learned from: at
the noted look-up it cites the note with probability ``trust``, so trusting a false note gives a wrong
answer, which reading the image would have avoided. Every look-up word records whether it was read or
copied and whether its object's note was true (``Word.lookup``, ``Word.note``). ``TaskConfig(note_rate=0,
distinct_values=False)`` (``NO_NOTES``) is the task without notes, problem for problem.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field, replace

from dyco_probe.task.render import COLOURS, SHAPES, SceneObject, cell_index, render_scene

ROLE_NEUTRAL, ROLE_VISUAL, ROLE_TEXT = "neutral", "visual", "text"
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
OPS = ("+", "-")
NOTE = "note"  # the note's marker in the question, and the decision to cite it in a look-up
LOOKUP_READ, LOOKUP_COPIED = "read", "copied"
SUBSETS = ("no_note", "true_note", "false_note")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the synthetic task. All values are plain numbers so a config is its own record."""

    grid: int = 4  # cells per side; the image is grid * cell_px pixels square
    cell_px: int = 28  # one merged vision token per cell (Qwen2.5-VL: 2x2 patches of 14 px)
    n_shapes: int = 6  # how many of SHAPES are in play
    n_colours: int = 6  # how many of COLOURS are in play
    min_objects: int = 6  # every scene shows every shape and every colour once: no attribute is
    max_objects: int = 6  # guessable from the others, only the pairing (which the question asks) varies
    min_hops: int = 2  # look-ups per question
    max_hops: int = 5
    min_value: int = 1
    max_value: int = 9
    key_attributes: tuple[str, ...] = ("shape", "colour")  # which attribute names the objects
    lookup_verb: str = ""  # word between key and value in a look-up step ("" -> "triangle red")
    jitter: int = 2  # object position jitter within its cell, pixels
    colour_jitter: int = 40  # per-channel colour noise
    min_size: float = 0.15  # object half-width, fraction of the cell
    max_size: float = 0.38
    pixel_noise: float = 70.0  # Gaussian pixel noise (std, 0-255 units)
    note_rate: float = 2 / 3  # share of questions with a note on one queried object
    false_note_rate: float = 0.5  # share of notes that name a wrong value (another one in the scene)
    distinct_values: bool = True  # table values of a question are distinct (a wrong look-up always shows)

    def __post_init__(self):
        if not 1 <= self.n_shapes <= len(SHAPES):
            raise ValueError(f"n_shapes must be in 1..{len(SHAPES)}, got {self.n_shapes}")
        if not 1 <= self.n_colours <= len(COLOURS):
            raise ValueError(f"n_colours must be in 1..{len(COLOURS)}, got {self.n_colours}")
        most = min(self.n_shapes, self.n_colours, self.grid * self.grid)
        if not 1 <= self.min_objects <= self.max_objects <= most:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {most} (distinct shapes and colours, one per cell); "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 1 <= self.min_hops <= self.max_hops <= self.min_objects:
            raise ValueError(
                f"need 1 <= min_hops <= max_hops <= min_objects (each look-up names a distinct object); "
                f"got hops {self.min_hops}..{self.max_hops}, min_objects {self.min_objects}"
            )
        for name in ("note_rate", "false_note_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lookup_verb == NOTE:
            raise ValueError(
                f"lookup_verb cannot be {NOTE!r}: that word marks a look-up copied from the note"
            )
        if self.distinct_values and self.max_value - self.min_value + 1 < max(self.n_shapes, self.n_colours):
            raise ValueError(
                f"distinct_values needs at least {max(self.n_shapes, self.n_colours)} values, "
                f"got {self.min_value}..{self.max_value}"
            )
        bad = set(self.key_attributes) - {"shape", "colour"}
        if bad or not self.key_attributes:
            raise ValueError(
                f"key_attributes must be a non-empty subset of ('shape', 'colour'), got {self.key_attributes}"
            )

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES[: self.n_shapes]

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(COLOURS)[: self.n_colours]

    @property
    def image_px(self) -> int:
        return self.grid * self.cell_px

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskConfig:
        """The config of a record; records written before notes existed mean the task without them."""
        d = dict(d)
        d.setdefault("note_rate", 0.0)
        d.setdefault("false_note_rate", 0.5)
        d.setdefault("distinct_values", False)
        if "key_attributes" in d:
            d["key_attributes"] = tuple(d["key_attributes"])
        return cls(**d)


@dataclass(frozen=True)
class Word:
    """One word of a chain of thought with its ground-truth role.

    ``cells`` lists the relevant image cells (row-major indices) of a visual word, for the first image,
    and of a value copied from the note (the cell it should have been read from). The value word of a
    look-up has ``lookup`` ``"read"`` or ``"copied"``, and ``note`` ``"true"`` or ``"false"`` when the
    question's note is about its object (else ``""``).
    """

    text: str
    role: str
    cells: tuple[int, ...] = ()
    lookup: str = ""
    note: str = ""


@dataclass(frozen=True)
class Note:
    """A question's note: it claims that the object named ``key`` has ``value``."""

    key: str
    value: str
    true: bool


@dataclass
class Problem:
    """A scene, a question about it, its gold chain of thought and answer."""

    id: str
    objects: list[SceneObject]
    question: str
    answer: str
    chain: list[Word]
    config: TaskConfig
    seed: int
    key_attribute: str = "shape"
    table: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # the queried objects' keys, in order
    ops: list[str] = field(default_factory=list)
    note: Note | None = None

    @property
    def completion(self) -> str:
        """The gold completion: chain of thought and answer, words separated by single spaces."""
        return " ".join(w.text for w in self.chain)

    @property
    def subset(self) -> str:
        """``"no_note"``, ``"true_note"`` or ``"false_note"``."""
        return "no_note" if self.note is None else ("true_note" if self.note.true else "false_note")

    @property
    def value_attribute(self) -> str:
        return _other(self.key_attribute)

    def value_of(self, key: str) -> str:
        """The value attribute of the object named ``key`` (what reading the image gives)."""
        return getattr(self.object_with(self.key_attribute, key), self.value_attribute)

    def chain_words(self, copied: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """The words of a chain of thought that reads every look-up from the image, except those of
        the keys in ``copied``, which cite the note (``KEY note VALUE``, the note's value)."""
        words: list[str] = [THINK_OPEN]
        total = None
        verb = [self.config.lookup_verb] if self.config.lookup_verb else []
        for i, k in enumerate(self.keys):
            if k in copied:
                if self.note is None or self.note.key != k:
                    raise ValueError(f"{self.id}: no note about {k!r} to copy")
                v = self.note.value
                words += [k, NOTE, v]
            else:
                v = self.value_of(k)
                words += [k, *verb, v]
            number = self.table[v]
            words += [";", v, "=", str(number), ";"]
            if total is None:
                total = number
            else:
                op = self.ops[i - 1]
                new = total + number if op == "+" else total - number
                words += [str(total), op, str(number), "=", str(new), ";"]
                total = new
        words = words[:-1]  # no separator before the closing tag
        return words + [THINK_CLOSE, ANSWER_OPEN, str(total), ANSWER_CLOSE]

    def render(self):
        """The scene as a PIL image."""
        c = self.config
        return render_scene(
            self.objects,
            c.grid,
            c.cell_px,
            jitter=c.jitter,
            seed=self.seed,
            colour_jitter=c.colour_jitter,
            size_range=(c.min_size, c.max_size),
            pixel_noise=c.pixel_noise,
        )

    def object_with(self, attribute: str, value: str) -> SceneObject | None:
        for obj in self.objects:
            if getattr(obj, attribute) == value:
                return obj
        return None


def _stable_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _other(attribute: str) -> str:
    return "colour" if attribute == "shape" else "shape"


def generate_problem(seed: int, config: TaskConfig = TaskConfig(), problem_id: str | None = None) -> Problem:
    """Generate one problem, deterministically in ``seed`` and ``config``."""
    rng = random.Random(seed)
    n_obj = rng.randint(config.min_objects, config.max_objects)
    shapes = rng.sample(config.shapes, n_obj)
    colours = rng.sample(config.colours, n_obj)
    cells = rng.sample(range(config.grid * config.grid), n_obj)
    objects = [
        SceneObject(shape=s, colour=c, row=cell // config.grid, col=cell % config.grid)
        for s, c, cell in zip(shapes, colours, cells)
    ]
    key = rng.choice(config.key_attributes)
    value_attr = _other(key)
    vocabulary = config.colours if value_attr == "colour" else config.shapes
    if config.distinct_values:
        values = rng.sample(range(config.min_value, config.max_value + 1), len(vocabulary))
        table = dict(zip(vocabulary, values))
    else:
        table = {v: rng.randint(config.min_value, config.max_value) for v in vocabulary}

    hops = rng.randint(config.min_hops, min(config.max_hops, n_obj))
    queried = rng.sample(objects, hops)
    ops = [rng.choice(OPS) for _ in range(hops - 1)]

    note = None
    if config.note_rate > 0 and rng.random() < config.note_rate:
        obj = rng.choice(queried)
        true_value = getattr(obj, value_attr)
        if rng.random() < config.false_note_rate:
            value = rng.choice(sorted(getattr(o, value_attr) for o in objects if o is not obj))
        else:
            value = true_value
        note = Note(getattr(obj, key), value, value == true_value)

    table_text = " , ".join(f"{v} {table[v]}" for v in vocabulary)
    expression = " ".join(
        [getattr(queried[0], key)]
        + [tok for op, obj in zip(ops, queried[1:]) for tok in (op, getattr(obj, key))]
    )
    note_text = f"{NOTE} {note.key} {note.value} . " if note else ""
    question = f"{table_text} . {note_text}compute {expression}"
    problem = Problem(
        id=problem_id or f"synth-{seed}",
        objects=objects,
        question=question,
        answer="",
        chain=[],
        config=config,
        seed=seed,
        key_attribute=key,
        table=table,
        keys=[getattr(o, key) for o in queried],
        ops=ops,
        note=note,
    )
    words = problem.chain_words()
    problem.answer = words[-2]
    problem.chain = label_words(words, problem)
    return problem


def teacher_chain(problem: Problem, trust: float, rng: random.Random) -> list[Word]:
    """The chain a biased teacher writes: the gold chain, except that at the look-up of a noted
    object it cites the note instead of reading the image with probability ``trust``."""
    if problem.note is None or trust <= 0 or rng.random() >= trust:
        return problem.chain
    return label_words(problem.chain_words(copied={problem.note.key}), problem)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _label_step(step: list[str], problem: Problem) -> list[Word]:
    """Roles of one ``;``-separated step of a chain of thought."""
    cfg = problem.config
    key = problem.key_attribute
    key_vocab = cfg.shapes if key == "shape" else cfg.colours
    verb = [cfg.lookup_verb] if cfg.lookup_verb else []
    n = len(step)
    is_read = n == 2 + len(verb) and step[1 : 1 + len(verb)] == verb
    is_copy = n == 3 and step[1] == NOTE
    # look-up: KEY [verb] VALUE (read from the image) or KEY note VALUE (copied from the note)
    if step and step[0] in key_vocab and (is_read or is_copy):
        obj = problem.object_with(key, step[0])
        cells = (cell_index(obj.row, obj.col, cfg.grid),) if obj is not None else ()
        note = problem.note
        noted = "" if note is None or note.key != step[0] else ("true" if note.true else "false")
        if is_copy:
            return [
                Word(step[0], ROLE_TEXT),
                Word(NOTE, ROLE_TEXT),  # the decision to cite the note, taken from the text
                Word(step[2], ROLE_TEXT, cells, LOOKUP_COPIED, noted),
            ]
        return (
            [Word(step[0], ROLE_TEXT)]
            + [Word(w, ROLE_NEUTRAL) for w in verb]
            + [Word(step[-1], ROLE_VISUAL, cells, LOOKUP_READ, noted)]
        )
    # table: VALUE = NUMBER
    if n == 3 and step[1] == "=" and not _is_int(step[0]):
        return [Word(step[0], ROLE_TEXT), Word("=", ROLE_NEUTRAL), Word(step[2], ROLE_TEXT)]
    # arithmetic: A op B = C
    if n == 5 and step[1] in OPS and step[3] == "=":
        return [Word(w, ROLE_NEUTRAL if w == "=" else ROLE_TEXT) for w in step]
    # anything else: numbers and operators derive from text, the rest is scaffolding
    return [Word(w, ROLE_TEXT if (_is_int(w) or w in OPS) else ROLE_NEUTRAL) for w in step]


def label_words(words: list[str], problem: Problem) -> list[Word]:
    """Ground-truth role of every word of a (gold or generated) completion of ``problem``.

    The chain is parsed into ``;``-separated steps (look-up, table, arithmetic). Roles follow the
    template, not correctness: in a generated look-up ``triangle blue`` the word ``blue`` is visual (read
    from the image, rightly or not) and its relevant cell is the triangle's. Unparseable steps fall back
    to: numbers and operators are text, everything else neutral. The answer between the answer tags is
    text.
    """
    out: list[Word] = []
    step: list[str] = []
    in_answer = False

    def flush():
        if step:
            out.extend(Word(w, ROLE_TEXT) for w in step) if in_answer else out.extend(
                _label_step(step, problem)
            )
            step.clear()

    for w in words:
        if w in _TAGS or w == ";":
            flush()
            out.append(Word(w, ROLE_NEUTRAL))
            if w == ANSWER_OPEN:
                in_answer = True
            elif w == ANSWER_CLOSE:
                in_answer = False
        else:
            step.append(w)
    flush()
    return out


def split_seed(split: str, index: int, base_seed: int = 0) -> int:
    """The seed of problem ``index`` of a named split: disjoint streams for train and test."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    return _stable_seed("dyco_probe-synthetic", base_seed, split, index)


def make_split(
    split: str, n: int, config: TaskConfig = TaskConfig(), start: int = 0, base_seed: int = 0
) -> list[Problem]:
    """Problems ``start .. start+n-1`` of a fixed split (deterministic)."""
    return [
        generate_problem(split_seed(split, i, base_seed), config, problem_id=f"{split}-{i}")
        for i in range(start, start + n)
    ]


def with_config(config: TaskConfig, **changes) -> TaskConfig:
    """A copy of ``config`` with some knobs changed (validated)."""
    return replace(config, **changes)


NO_NOTES = TaskConfig(note_rate=0.0, distinct_values=False)
"""The task without notes (the built-in model's task before the positive control), problem for problem."""
