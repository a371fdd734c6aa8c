"""Sweep files: the TOML schema, and the grid of conditions it expands to.

A sweep file (all tables optional except `[[grid]]`; relative paths are relative to the current
directory; unknown keys are errors)::

    name = "image-knockout"          # default: the file's stem
    out = "runs/sweeps/image-knockout"   # default: runs/sweeps/<name>
    seed = 0                         # matched random controls

    [model]
    source = "builtin"               # "builtin", a local checkpoint directory, or "untrained"
    device = "auto"                  # "auto": cuda:<LOCAL_RANK> when CUDA is available, else cpu
    dtype = "float32"
    seed = 0                         # "untrained" only: initialisation seed
    arch = { num_layers = 2 }        # "untrained" only: BuiltinArchitecture fields

    [data]
    split = "test"                   # synthetic split ... or
    # jsonl = "data/x.jsonl"         # a VLM-R1 jsonl file
    start = 0
    n = 64
    batch_size = 16                  # samples per forward / generate call
    trajectory = "greedy"            # reference trajectory: "greedy" (the model's own) or "gold"
    max_new_tokens = 64
    slices = [{ name = "early", start = 0, n = 32 }, { name = "late", start = 32, n = 32 }]
                                     # default: one slice "all"; start/n relative to the data

    [roles]                          # how role labellers see the trajectories
    layers = "last"                  # probed layers of their trace: "last", "all" or a list
    tau_vis = 0.0                    # thresholds of the dynamics rules (docs/method.md#token-roles:
    tau_txt = 0.05                   #   fisher_rao, hellinger, l2, ... in their distance's units)
    text_span = "post_image"
    # theta = 0.5                    # ratio_threshold only (and theta_txt); its defaults otherwise
    # counterfactual = "blank"       # visual_dependency only: "blank", "patches" or "swap", with
    # divergence = "kl"              #   "kl" or "k3", visual_above / text_below (nats) and, for
    # visual_above = 0.1             #   patches, mask_fraction and patch_size; its defaults otherwise

    [readouts]
    teacher_forced = true
    free_running = true

    [[grid]]                         # one or more sub-grids; the sweep is the union of their products
    keys = ["image"]                 # key spans (dyco_probe.interventions.spec.KEY_SPANS)
    strengths = [0.0]                # λ; 0 = knockout
    targets = ["visual", "random:visual", "text"]   # queries (dyco_probe.interventions.queries)
    role_sources = ["ground_truth", "fisher_rao"]   # any labeller of dyco_probe.labellers
    layers = ["each", "all"]         # "all", "each", "window:K[:S]", N, "A-B" or a list of ints
    heads = ["all"]                  # "all", "each", N or a list of ints

    [[grid]]                         # activation patching
    patch = "attention_output"       # or "image_states" (targets / heads then do not apply)
    donor = "swap"                   # counterfactual image: "swap" (the next example's) or "blank"
    direction = "noise"              # "noise": clean run, counterfactual values patched in;
                                     # "restore": counterfactual run, clean values patched back
    targets = ["visual", "random:visual"]
    layers = ["each"]

A *condition* is one point of the grid on one slice; its `id` is a hash of its fields, so adding
grid entries later keeps finished conditions finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..labellers import check_options, get_labeller
from ..layers import parse_layer_choice
from ..roles import TAU_TXT, TAU_VIS
from .queries import TARGETS
from .spec import KEY_SPANS, Intervention, layers_label, parse_layers
from .trajectories import TRAJECTORIES, check_role_source

__all__ = ["Condition", "GridSpec", "SliceSpec", "SweepConfig", "expand_conditions", "labeller_options"]

PATCH_SITES = ("attention_output", "image_states")
DONORS = ("swap", "blank")
DIRECTIONS = ("noise", "restore")


def _check_keys(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# `[roles]` entries that are labeller options (numbers, then names); each labeller gets those it takes.
NUMBER_OPTIONS = (
    "tau_vis",
    "tau_txt",
    "theta",
    "theta_txt",
    "visual_above",
    "text_below",
    "mask_fraction",
    "patch_size",
)
NAME_OPTIONS = ("counterfactual", "divergence")
LABELLER_OPTIONS = NUMBER_OPTIONS + NAME_OPTIONS


def labeller_options(source: str, roles: dict) -> dict:
    """The options of `roles` (a sweep's `[roles]` table) that the labeller `source` takes, e.g.
    `tau_vis`, `tau_txt` for the dynamics rules, `theta`, `theta_txt` for `ratio_threshold` and
    `counterfactual`, `visual_above`, ... for `visual_dependency`."""
    params = inspect.signature(get_labeller(source)).parameters
    return {
        k: (roles[k] if k in NAME_OPTIONS else float(roles[k]))
        for k in LABELLER_OPTIONS
        if k in roles and k in params
    }


@dataclass(frozen=True)
class SliceSpec:
    """A named range of the data: items `start .. start+n-1` (relative to `[data] start`)."""

    name: str
    start: int
    n: int


@dataclass(frozen=True)
class GridSpec:
    """One `[[grid]]` table (lists of values; the product is taken)."""

    keys: tuple = ("image",)
    strengths: tuple = (0.0,)
    targets: tuple = ("visual", "random:visual")
    role_sources: tuple = ("ground_truth",)
    layers: tuple = ("all",)
    heads: tuple = ("all",)
    patch: str | None = None
    donor: str = "swap"
    direction: str = "noise"

    @classmethod
    def from_dict(cls, d: dict, where: str) -> GridSpec:
        _check_keys(d, cls.__dataclass_fields__, where)
        kw = {}
        for k in ("keys", "strengths", "targets", "role_sources", "layers", "heads"):
            if k in d:
                kw[k] = tuple(_as_list(d[k]))
        for k in ("patch", "donor", "direction"):
            if k in d:
                kw[k] = d[k]
        g = cls(**kw)
        for key in g.keys:
            if key not in KEY_SPANS:
                raise ValueError(f"{where}: unknown key span {key!r}; valid: {', '.join(KEY_SPANS)}")
        for s in g.strengths:
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"{where}: strengths must be numbers >= 0 (0 = knockout), got {s!r}")
        for t in g.targets:
            if t not in TARGETS and not str(t).startswith("positions:"):
                raise ValueError(f"{where}: unknown target {t!r}; valid: {', '.join(TARGETS)}, positions:i,j")
        for r in g.role_sources:
            try:
                check_role_source(r)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if g.patch is not None and g.patch not in PATCH_SITES:
            raise ValueError(f"{where}: patch must be one of {', '.join(PATCH_SITES)}, got {g.patch!r}")
        if g.donor not in DONORS:
            raise ValueError(f"{where}: donor must be one of {', '.join(DONORS)}, got {g.donor!r}")
        if g.direction not in DIRECTIONS:
            raise ValueError(
                f"{where}: direction must be one of {', '.join(DIRECTIONS)}, got {g.direction!r}"
            )
        return g


@dataclass
class SweepConfig:
    """A parsed sweep file (see the module docstring for the schema)."""

    name: str
    out: str
    seed: int = 0
    model: dict = field(default_factory=lambda: {"source": "builtin"})
    data: dict = field(default_factory=dict)
    slices: list[SliceSpec] = field(default_factory=list)
    roles: dict = field(default_factory=dict)
    readouts: dict = field(default_factory=lambda: {"teacher_forced": True, "free_running": True})
    grids: list[GridSpec] = field(default_factory=list)
    path: str | None = None

    MODEL_KEYS = ("source", "device", "dtype", "seed", "arch")
    DATA_KEYS = (
        "split",
        "jsonl",
        "start",
        "n",
        "batch_size",
        "trajectory",
        "max_new_tokens",
        "slices",
        "skip_bad",
    )
    ROLE_KEYS = ("layers", "text_span", *LABELLER_OPTIONS)
    READOUT_KEYS = ("teacher_forced", "free_running")

    @classmethod
    def load(cls, path) -> SweepConfig:
        """Read a sweep TOML file."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        with path.open("rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from e
        return cls.from_dict(raw, name=path.stem, path=str(path))

    @classmethod
    def from_dict(cls, raw: dict, name: str = "sweep", path: str | None = None) -> SweepConfig:
        where = path or "sweep"
        _check_keys(raw, ("name", "out", "seed", "model", "data", "roles", "readouts", "grid"), where)
        name = str(raw.get("name", name))
        model = {"source": "builtin", "device": "auto", "dtype": "float32", **raw.get("model", {})}
        _check_keys(model, cls.MODEL_KEYS, f"{where} [model]")
        data = {
            "split": "test",
            "start": 0,
            "n": 64,
            "batch_size": 16,
            "trajectory": "greedy",
            "max_new_tokens": 64,
            "skip_bad": False,
            **raw.get("data", {}),
        }
        _check_keys(data, cls.DATA_KEYS, f"{where} [data]")
        if data["trajectory"] not in TRAJECTORIES:
            raise ValueError(f"{where} [data]: trajectory must be one of {', '.join(TRAJECTORIES)}")
        for k in ("n", "batch_size", "max_new_tokens"):
            if int(data[k]) < 1:
                raise ValueError(f"{where} [data]: {k} must be >= 1")
        slices = []
        for k, s in enumerate(data.pop("slices", None) or [{"name": "all", "start": 0, "n": data["n"]}]):
            _check_keys(s, ("name", "start", "n"), f"{where} [data] slice {k}")
            sl = SliceSpec(
                str(s.get("name", f"slice{k}")), int(s.get("start", 0)), int(s.get("n", data["n"]))
            )
            if sl.start < 0 or sl.n < 1 or sl.start + sl.n > int(data["n"]):
                raise ValueError(
                    f"{where}: slice {sl.name!r} ({sl.start}+{sl.n}) is outside the {data['n']} items"
                )
            slices.append(sl)
        if len({s.name for s in slices}) != len(slices):
            raise ValueError(f"{where}: slice names must be distinct")
        roles = {
            "layers": "last",
            "tau_vis": TAU_VIS,
            "tau_txt": TAU_TXT,
            "text_span": "post_image",
            **raw.get("roles", {}),
        }
        _check_keys(roles, cls.ROLE_KEYS, f"{where} [roles]")
        for k in NUMBER_OPTIONS:
            if k in roles and (isinstance(roles[k], bool) or not isinstance(roles[k], (int, float))):
                raise ValueError(f"{where} [roles]: {k} must be a number, got {roles[k]!r}")
        for k in NAME_OPTIONS:
            if k in roles and not isinstance(roles[k], str):
                raise ValueError(f"{where} [roles]: {k} must be a string, got {roles[k]!r}")
        try:  # bad values fail here, not in the middle of the sweep
            check_options("visual_dependency", labeller_options("visual_dependency", roles))
        except ValueError as e:
            raise ValueError(f"{where} [roles]: {e}") from None
        readouts = {"teacher_forced": True, "free_running": True, **raw.get("readouts", {})}
        _check_keys(readouts, cls.READOUT_KEYS, f"{where} [readouts]")
        grids_raw = raw.get("grid")
        if not grids_raw:
            raise ValueError(f"{where}: no [[grid]] table: nothing to sweep")
        grids_raw = [grids_raw] if isinstance(grids_raw, dict) else grids_raw
        grids = [GridSpec.from_dict(g, f"{where} grid {k}") for k, g in enumerate(grids_raw)]
        return cls(
            name=name,
            out=str(raw.get("out", f"runs/sweeps/{name}")),
            seed=int(raw.get("seed", 0)),
            model=model,
            data=data,
            slices=slices,
            roles=roles,
            readouts=readouts,
            grids=grids,
            path=path,
        )

    def identity(self) -> dict:
        """What results depend on besides the condition itself; a sweep directory keeps one identity."""
        data = {
            k: self.data[k]
            for k in ("split", "jsonl", "start", "n", "trajectory", "max_new_tokens")
            if k in self.data
        }
        model = {k: v for k, v in self.model.items() if k != "device"}
        return {"model": model, "data": data, "roles": self.roles, "seed": self.seed}

    def trace_config(self):
        """The `TraceConfig` of the Fisher–Rao roles."""
        from ..tracing import TraceConfig

        layers = self.roles["layers"]
        layers = parse_layer_choice(layers) if isinstance(layers, str) else layers
        return TraceConfig(layers=layers, text_span=self.roles["text_span"])


@dataclass(frozen=True)
class Condition:
    """One point of a sweep grid.

    Attributes:
        kind: `"knockout"`, `"scale"`, `"patch_attention_output"` or `"patch_image_states"`.
        keys: key span (attention interventions; `""` for patches).
        strength: λ (0 for knockouts; NaN for patches).
        target: query target (`""` for image-state patches, which act on states, not queries).
        role_source: where the roles of role targets come from (`""` where no role is involved).
        layers: layer indices; `layers_name` their label (`"all"`, `"2"`, `"0-1"`).
        heads: query heads (None = all).
        slice: data slice name.
        donor, direction: patches only.
    """

    kind: str
    keys: str
    strength: float
    target: str
    role_source: str
    layers: tuple[int, ...]
    layers_name: str
    heads: tuple[int, ...] | None
    slice: str
    donor: str = ""
    direction: str = ""

    @property
    def id(self) -> str:
        d = asdict(self)
        d["strength"] = None if math.isnan(self.strength) else self.strength
        blob = json.dumps(d, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def is_patch(self) -> bool:
        return self.kind.startswith("patch_")

    def intervention(self, text_span: str = "post_image") -> Intervention | None:
        """The attention intervention of this condition (None for patches)."""
        if self.is_patch:
            return None
        return Intervention(
            keys=self.keys, scale=self.strength, layers=self.layers, heads=self.heads, text_span=text_span
        )

    def columns(self) -> dict:
        """The condition's columns in a results row."""
        return {
            "condition_id": self.id,
            "kind": self.kind,
            "keys": self.keys,
            "strength": self.strength,
            "target": self.target,
            "role_source": self.role_source,
            "layers": self.layers_name,
            "heads": "all" if self.heads is None else ",".join(map(str, self.heads)),
            "slice": self.slice,
            "donor": self.donor,
            "direction": self.direction,
        }


def _heads(spec, num_heads: int) -> list[tuple[int, ...] | None]:
    if spec == "all":
        return [None]
    if spec == "each":
        return [(h,) for h in range(num_heads)]
    try:
        heads = tuple(sorted({int(h) for h in _as_list(spec)}))
    except (TypeError, ValueError):
        raise ValueError(f"bad head selection {spec!r}; use all, each, N or a list of ints") from None
    if any(h < 0 or h >= num_heads for h in heads):
        raise ValueError(f"heads {spec} out of range: the model has {num_heads} heads (0 to {num_heads - 1})")
    return [heads]


def _needs_roles(target: str) -> bool:
    return not (target == "all" or target.startswith("positions:"))


def expand_conditions(config: SweepConfig, num_layers: int, num_heads: int) -> list[Condition]:
    """Every condition of the sweep, in a fixed order (slices, grids, then the grid's axes), without duplicates."""
    out: dict[str, Condition] = {}
    where = config.path or "sweep"
    for sl in config.slices:
        for k, g in enumerate(config.grids):
            try:
                windows = [w for spec in g.layers for w in parse_layers(spec, num_layers)]
                heads = [h for spec in g.heads for h in _heads(spec, num_heads)]
            except ValueError as e:
                raise ValueError(f"{where} grid {k}: {e}") from None
            if g.patch == "image_states":
                axes = [("", math.nan, "", "", w, None) for w in windows]
            elif g.patch == "attention_output":
                axes = [
                    ("", math.nan, t, r if _needs_roles(t) else "", w, h)
                    for t in g.targets
                    for r in g.role_sources
                    for w in windows
                    for h in heads
                ]
            else:
                axes = [
                    (k, float(s), t, r if _needs_roles(t) else "", w, h)
                    for k in g.keys
                    for s in g.strengths
                    for t in g.targets
                    for r in g.role_sources
                    for w in windows
                    for h in heads
                ]
            for keys, strength, target, source, window, head in axes:
                if g.patch:
                    kind, donor, direction = f"patch_{g.patch}", g.donor, g.direction
                else:
                    kind, donor, direction = ("knockout" if strength == 0 else "scale"), "", ""
                c = Condition(
                    kind=kind,
                    keys=keys,
                    strength=strength,
                    target=target,
                    role_source=source,
                    layers=tuple(window),
                    layers_name=layers_label(tuple(window), num_layers),
                    heads=head,
                    slice=sl.name,
                    donor=donor,
                    direction=direction,
                )
                out.setdefault(c.id, c)
    return list(out.values())
