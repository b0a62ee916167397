"""The one config layer of the demos: a JSON file (plus `key=value` overrides) -> a typed, validated dataclass.

A config class is a plain `@dataclass` whose fields all have defaults. Validation lives in each field's metadata:

    steps: int = field(default=15, metadata={"help": "denoising steps", "min": 1, "max": 1000})

Metadata keys: `help` (str), `min`, `max`, `multiple_of` (numbers; applied to every number of a list),
`choices` (allowed values), `pattern` (a regular expression a string must match in full).
Field types: str, int, float (an integer is accepted), bool, `X | None`, `list[X]`, `Literal[...]`, `str | list[str]`.
A class may define `check(self) -> list[str]` for cross-field rules. It runs even when some values are invalid: those
fields then hold a stand-in whose every use stops the rule reading it (its own problem is already reported), so a rule
runs whenever the fields it needs are valid; `check_rules` keeps one stopped rule from stopping the others.
Keys starting with "_" in a config file are comments (e.g. the "_help" block of `--print-config`) and are ignored, as is
"$schema" (the JSON Schema an editor checks the file against: `python -m stableflow.config --write-schemas`).

Every problem -- broken JSON, unknown keys, wrong types, out-of-range values -- is collected and raised at once as
one `ConfigError`; `run_demo` turns any `UserError` into `error: ...` on stderr and exit status 2.

Why not pydantic v2: it would replace `_coerce`/`_convert` (~100 lines) but not the rest (broken JSON with a caret,
did-you-mean for keys and values, overrides read as JSON then as text), and its messages differ from the ones users and
tests rely on; mapping its errors back to ours would cost as much code as it saves, for a new dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence, TypeVar

from flux.errors import UserError
from flux.util import configs as MODELS  # the registry: the one list of model names

if TYPE_CHECKING:  # torch loads only once a demo runs, so bad configs and --print-config answer at once
    from flux.pipeline import FluxModels

__all__ = [
    "BaseConfig",
    "ConfigError",
    "check_rules",
    "config_json",
    "config_to_dict",
    "default_config_json",
    "load_config",
    "load_models_for",
    "native_size",
    "output_dir_problems",
    "run_demo",
]

C = TypeVar("C")
_META_KEYS = {"help", "min", "max", "multiple_of", "choices", "pattern"}
_NoneType = type(None)


class ConfigError(UserError):
    """Every problem found in one config (file and overrides), one per line in the message."""

    def __init__(self, problems: Sequence[str], source: str | None):
        self.problems = list(problems)
        self.source = source
        where = f"config file '{source}'" if source else "the config"
        if len(self.problems) == 1:
            super().__init__(f"{where}: {self.problems[0]}")
        else:
            super().__init__(
                f"{where} has {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
            )


# ---------------------------------------------------------------------------------------------------------------
# Types: checking a JSON value against a field's annotation


class _Mismatch(Exception):
    """A value does not have the annotated type; `path` locates the bad element inside a list."""

    def __init__(self, expected: str, value: Any, path: str = ""):
        self.expected, self.value, self.path = expected, value, path


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    """`tp` as the words that follow 'must be'."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is _NoneType:
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return json.dumps(choices[0]) if len(choices) == 1 else "one of " + ", ".join(json.dumps(c) for c in choices)
    if origin is list:
        (item,) = typing.get_args(tp)
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return "a list of " + plural.get(item, f"items that are each {_describe(item)}")
    if _is_union(tp):
        parts = [_describe(a) for a in typing.get_args(tp)]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    raise TypeError(f"unsupported config field type {tp!r}")


def _show(value: Any) -> str:
    """A JSON value as it would appear in the file, with its kind where that helps."""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, bool):
        return f"{text} (a true/false value)"
    if isinstance(value, str):
        return f"{text} (a string)"
    if isinstance(value, list):
        return f"{text} (a list)"
    if isinstance(value, dict):
        return f"{text} (an object)"
    if isinstance(value, float) and not value.is_integer():
        return f"{text} (a number with a fraction)"
    return text


def _coerce(value: Any, tp: Any) -> Any:
    """`value` converted to `tp` (ints become floats, lists are copied); raises _Mismatch."""
    if tp is bool or tp is str or tp is _NoneType:
        if type(value) is tp or (tp is _NoneType and value is None):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 4096.0: an integer to JSON (and its Schema) too
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Mismatch("a finite number", value)
            return float(value)
    elif typing.get_origin(tp) is Literal:
        if any(value == c and type(value) is type(c) for c in typing.get_args(tp)):
            return value
    elif typing.get_origin(tp) is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(_coerce(v, item))
                except _Mismatch as e:
                    raise _Mismatch(e.expected, e.value, f"[{i}]{e.path}") from None
            return out
    elif _is_union(tp):
        errors = []
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch as e:
                errors.append(e)
        for e in errors:  # a list that failed inside: report the element, not "must be a string or a list"
            if e.path:
                raise e
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _Mismatch(_describe(tp), value)


# ---------------------------------------------------------------------------------------------------------------
# Schema: the fields of a config class


@dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    default: Any
    meta: dict[str, Any]


_schemas: dict[type, list[_Field]] = {}


def _schema(cls: type) -> list[_Field]:
    """The validated field list of `cls`; mistakes in the class itself are TypeErrors (bugs, not user errors)."""
    if cls in _schemas:
        return _schemas[cls]
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default: every config key must have one")
        meta = dict(f.metadata)
        if unknown := set(meta) - _META_KEYS:
            raise TypeError(
                f"{cls.__name__}.{f.name}: unknown metadata {sorted(unknown)}; allowed: {sorted(_META_KEYS)}"
            )
        tp = hints[f.name]
        _describe(tp)  # rejects unsupported types now, not when a user happens to set the key
        fields.append(_Field(f.name, tp, default, meta))
        # The defaults must pass their own rules, or --print-config would print a config that fails to load.
        if problems := _check_value(fields[-1], default):
            raise TypeError(f"{cls.__name__}: default violates its own rules: {problems}")
    _schemas[cls] = fields
    return fields


def _literal_choices(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [c for a in typing.get_args(tp) if typing.get_origin(a) is Literal for c in typing.get_args(a)]


def _leaves(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _check_value(f: _Field, value: Any) -> list[str]:
    """Every rule that `value` breaks for field `f` (empty: valid)."""
    try:
        _convert(f, value)
    except _Problems as p:
        return p.messages
    return []


class _Problems(Exception):
    def __init__(self, messages: list[str]):
        self.messages = messages


def _convert(f: _Field, value: Any) -> Any:
    """`value` converted for field `f`; raises _Problems with every rule it breaks."""
    raw = value
    try:
        value = _coerce(value, f.type)
    except _Mismatch as e:
        hint = _did_you_mean(e.value, _literal_choices(f.type)) if not e.path else ""
        raise _Problems([f"'{f.name}{e.path}' must be {e.expected}, got {_show(e.value)}{hint}"]) from None
    problems = []
    meta = f.meta
    for i, leaf in enumerate(_leaves(raw)):  # the value as written: -1, not -1.0
        where = f"'{f.name}[{i}]'" if isinstance(value, list) else f"'{f.name}'"
        if leaf is None or isinstance(leaf, bool):
            continue
        if isinstance(leaf, (int, float)):
            if "min" in meta and leaf < meta["min"]:
                problems.append(f"{where} must be at least {meta['min']}, got {leaf}")
            if "max" in meta and leaf > meta["max"]:
                problems.append(f"{where} must be at most {meta['max']}, got {leaf}")
            step = meta.get("multiple_of")
            if step and leaf % step:
                low = leaf // step * step
                near = f"{low} or {low + step}" if low > 0 else f"{low + step}"
                problems.append(f"{where} must be a multiple of {step}, got {leaf} (nearest: {near})")
        if isinstance(leaf, str) and "pattern" in meta and not re.fullmatch(meta["pattern"], leaf):
            problems.append(f"{where} has an invalid value {_show(leaf)}: expected {meta.get('help', meta['pattern'])}")
        if "choices" in meta and leaf not in meta["choices"]:
            choices = ", ".join(json.dumps(c) for c in meta["choices"])
            problems.append(
                f"{where} must be one of {choices}, got {_show(leaf)}{_did_you_mean(leaf, meta['choices'])}"
            )
    if problems:
        raise _Problems(problems)
    return value


def _did_you_mean(word: Any, options: Sequence[Any]) -> str:
    if not isinstance(word, str):
        return ""
    strings = [o for o in options if isinstance(o, str)]
    close = difflib.get_close_matches(word, strings, n=1, cutoff=0.6)
    return f" — did you mean {json.dumps(close[0])}?" if close else ""


def _field_help(f: _Field) -> str:
    """A field's help text followed by its rules, e.g. "denoising steps [integer; 1..1000]"."""
    rules = [_describe(f.type).removeprefix("a ").removeprefix("an ")]
    lo, hi = f.meta.get("min"), f.meta.get("max")
    if lo is not None or hi is not None:
        rules.append(f"{'' if lo is None else lo}..{'' if hi is None else hi}")
    if "multiple_of" in f.meta:
        rules.append(f"multiple of {f.meta['multiple_of']}")
    if "choices" in f.meta:
        rules.append("one of " + ", ".join(map(str, f.meta["choices"])))
    text = f.meta.get("help", "")
    return f"{text} [{'; '.join(rules)}]".strip()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> tuple[Any, list[str]]:
    """The parsed file, or None and the problems that stop it being read."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.json"))
        hint = f" (it holds: {', '.join(inside[:8])})" if inside else ""
        return None, [f"is a folder, not a file: pass the path of a .json config file{hint}"]
    if not path.exists():
        near = (
            difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*")], n=1)
            if path.parent.is_dir()
            else []
        )
        hint = f" — did you mean '{path.parent / near[0]}'?" if near else ""
        return None, [f"no such file{hint}"]
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows may add a byte-order mark
    except OSError as e:
        return None, [f"cannot be read: {e.strerror or e}"]
    except UnicodeDecodeError as e:
        return None, [f"is not a UTF-8 text file (bad byte at offset {e.start}): is it really a JSON config?"]
    if not text.strip():
        return None, ['is empty: write a JSON object such as {"seed": 0}, or print a full one with --print-config']
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if e.lineno - 1 < len(text.splitlines()) else ""
        hint = ""
        before = text[: e.pos].rstrip()
        if e.msg.startswith("Expecting property name") and before.endswith(","):
            hint = " (a trailing comma before '}'? JSON allows none)"
        elif e.msg.startswith("Expecting value") and before.endswith(","):
            hint = " (a trailing comma before ']'? JSON allows none)"
        elif e.msg.startswith("Expecting property name") and text[e.pos : e.pos + 1] == "'":
            hint = " (JSON needs double quotes \", not ')"
        elif e.msg.startswith("Expecting ',' delimiter"):
            hint = " (a missing comma between two entries?)"
        return None, [
            f"broken JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}\n"
            f"      {line}\n      {' ' * (e.colno - 1)}^"
        ]
    if not isinstance(data, dict):
        return None, [f'must hold one JSON object {{"key": value, ...}}, not {_show(data)}']
    return data, []


def _parse_override(text: str) -> tuple[str, list[Any]] | None:
    """ "key=value" -> key and candidate values: the JSON reading first, then the plain string."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), [raw]
    return key.strip(), [parsed, raw] if parsed != raw else [parsed]


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """The config `cls` from the JSON file at `path` (None: the defaults) with `key=value` overrides on top.

    Raises ConfigError listing every problem at once.
    """
    fields = {f.name: f for f in _schema(cls)}
    names = list(fields)
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        loaded, problems = _read_json(Path(path))
        data = loaded or {}
    # Overrides replace file values before validation, so `width=512` also repairs a bad width in the file.
    raw: dict[str, tuple[list[Any], str]] = {}  # key -> (candidate values, where the value came from)
    for key, value in data.items():
        if key.startswith("_") or key == "$schema":
            continue  # comments, and the schema an editor validates the file against
        if key not in fields:
            problems.append(f"unknown key '{key}'{_did_you_mean_key(key, names)}")
        else:
            raw[key] = ([value], "")
    for text in overrides:
        parsed = _parse_override(text)
        if parsed is None:
            problems.append(f"command-line override '{text}' must look like key=value (e.g. seed=7)")
        elif parsed[0] not in fields:
            problems.append(
                f"command-line override '{text}': unknown key '{parsed[0]}'{_did_you_mean_key(parsed[0], names)}"
            )
        else:
            raw[parsed[0]] = (parsed[1], f"command-line override '{text}': ")
    values: dict[str, Any] = {}
    for key, (candidates, origin) in raw.items():
        errors: list[str] = []
        for candidate in candidates:  # `prompt=123` is a string prompt, `seed=123` an integer
            try:
                values[key] = _convert(fields[key], candidate)
                break
            except _Problems as p:
                errors = errors or p.messages
        else:
            problems += [origin + m for m in errors]
    invalid = {key: _Invalid(key) for key in raw if key not in values}
    cfg = cls(**values, **invalid)
    problems += _run_check(cfg)
    if problems:
        raise ConfigError(problems, str(path) if path is not None else None)
    return cfg


class _NeedsInvalid(Exception):
    """A cross-field rule used a field whose value is invalid: the rule is skipped."""


class _Invalid:
    """Stands in for a field whose value broke its own rules while `check()` runs: every use of it (comparison,
    truth, iteration, hashing, str, path) raises _NeedsInvalid, which stops the rule that needs the field."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<invalid '{self.name}'>"

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        raise _NeedsInvalid(self.name)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __len__ = __iter__ = _stop  # type: ignore
    __contains__ = __getitem__ = __getattr__ = __str__ = __format__ = __fspath__ = __int__ = __float__ = _stop  # type: ignore
    __index__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __mod__ = __neg__ = _stop  # type: ignore


def _run_check(cfg: Any) -> list[str]:
    """The problems `cfg.check()` finds; nothing if it needs an invalid field outside `check_rules`."""
    check = getattr(cfg, "check", None)
    if not callable(check):
        return []
    try:
        return list(check())
    except UserError as e:
        return [str(e)]
    except _NeedsInvalid:
        return []


def check_rules(*rules: Callable[[], Any]) -> list[str]:
    """Run independent cross-field rules; each returns a list of problems (or None) or raises UserError. A rule
    that needs a field whose value is invalid is skipped, and the others still run, so every problem of a config
    is reported at once."""
    problems: list[str] = []
    for rule in rules:
        try:
            problems += rule() or []
        except UserError as e:
            problems.append(str(e))
        except _NeedsInvalid:
            pass
    return problems


def _did_you_mean_key(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:  # case or separator slips: "numSteps", "num-steps"
        folded = {n.replace("_", "").lower(): n for n in names}
        hit = folded.get(key.replace("-", "").replace("_", "").lower())
        close = [hit] if hit else []
    return f" — did you mean '{close[0]}'?" if close else " (--print-config lists every key)"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config's keys and values in field order, as plain JSON-ready data."""
    return {f.name: _copy(getattr(cfg, f.name)) for f in _schema(type(cfg))}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def config_json(cfg: Any, with_help: bool = True) -> str:
    """Pretty JSON of `cfg`; with_help adds a "_help" object (ignored when loading) explaining every key."""
    data: dict[str, Any] = config_to_dict(cfg)
    if with_help:
        data["_help"] = {f.name: _field_help(f) for f in _schema(type(cfg))}
    lines = []
    for key, value in data.items():
        text = json.dumps(value, ensure_ascii=False)
        if len(text) > 80 or key == "_help":  # short lists stay on one line, long ones get one item a line
            text = json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n  ")
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def default_config_json(cls: type) -> str:
    """Every key of `cls` with its default, then "_help" with each key's meaning and rules; loads back as is."""
    return config_json(cls())


# ---------------------------------------------------------------------------------------------------------------
# What every demo shares


@dataclass
class BaseConfig:
    """Keys every demo has: which model, where its weights are, and where it runs."""

    model: str = field(
        default="flux-dev",
        metadata={
            "help": "flux-dev (best quality, gated licence), flux-schnell (few steps, Apache-2.0), flux-krea-dev "
            "(FLUX.1 Krea [dev], gated), flux-mini (small, trained on a world of coloured shapes, shipped: real "
            "pictures on a CPU) or flux-tiny (tiny random weights, for tests)",
            "choices": list(MODELS),
        },
    )
    flow_path: str | None = field(
        default=None,
        metadata={
            "help": "local transformer .safetensors file instead of downloading (null: download; env FLUX_MODEL also works)"
        },
    )
    ae_path: str | None = field(
        default=None,
        metadata={
            "help": "local autoencoder ae.safetensors instead of downloading (null: download; env FLUX_AE also works)"
        },
    )
    t5_path: str | None = field(
        default=None, metadata={"help": "local T5 text-encoder folder (transformers format) instead of downloading"}
    )
    clip_path: str | None = field(
        default=None, metadata={"help": "local CLIP text-encoder folder (transformers format) instead of downloading"}
    )
    dtype: Literal["bf16", "fp16", "fp32"] = field(
        default="bf16",
        metadata={
            "help": "weights and activations: bf16 (safe default), fp16 (may give black images), fp32 (CPU, tests)"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
            "pattern": r"auto|cpu|mps|cuda(:\d+)?",
        },
    )
    offload: bool = field(
        default=False,
        metadata={
            "help": "keep each model on the GPU only while it is used (text encoders, transformer, decoder): "
            "less GPU memory, slower"
        },
    )
    output_dir: str = field(default="outputs", metadata={"help": "folder for the outputs (created if missing)"})
    compile: Literal["auto"] | bool = field(
        default="auto",
        metadata={
            "help": "compile each transformer block and the autoencoder's decoder (torch.compile, a one-time compile per "
            "image size): faster steps and decoding, outputs within bf16 rounding (docs/performance.md); auto: "
            "on for bf16 on a CUDA GPU of compute capability 8.0+ (not with stream_blocks)"
        },
    )
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = field(
        default="auto",
        metadata={
            "help": "attention kernel: auto (cuDNN first on Hopper GPUs, torch's choice elsewhere) or one to prefer"
        },
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "FP8 e4m3 weights for the transformer's block linears (Ada/Hopper GPUs): half the memory, "
            "faster, approximate (see docs/performance.md for its error vs bf16); not for ablation sweeps"
        },
    )
    stream_blocks: Literal["auto"] | bool = field(
        default="auto",
        metadata={
            "help": "keep transformer blocks in pinned CPU memory and copy each to the GPU just before it runs "
            "(lossless; for 24 GB cards); replaces offload for the transformer; auto: on when the CUDA GPU's "
            "free memory cannot hold the transformer and text encoders (not with offload, fp8 or compile=true)"
        },
    )
    resident_gb: Literal["auto"] | float = field(
        default="auto",
        metadata={
            "help": "with stream_blocks: GiB of blocks that stay on the GPU (15 on a 24 GB card); auto: the free "
            "memory less 8.5 GiB for streaming slots, activations and decoding",
            "min": 0,
        },
    )
    fuse_gelu: Literal["auto"] | bool = field(
        default="auto",
        metadata={
            "help": "apply the MLPs' GELU inside their matmuls (cuBLASLt epilogue) and skip the single blocks' "
            "concatenation: faster steps on a GPU, outputs within bf16 rounding; with fp8, GELU and quantisation "
            "of the MLP hidden layer in one kernel (docs/performance.md); auto: as compile"
        },
    )

    def check(self) -> list[str]:
        """Cross-field rules; subclasses that add their own should extend `super().check()`."""

        def path_rule(name: str) -> Callable[[], list[str]]:
            value = getattr(self, name)
            return lambda: (
                [
                    f"'{name}' points to '{value}', which does not exist (fix the path, or set it to null "
                    "to download the weights)"
                ]
                if value is not None and not Path(value).expanduser().exists()
                else []
            )

        return check_rules(
            lambda: (
                ["'compile' and 'stream_blocks' do not combine: choose one"]
                if self.compile is True and self.stream_blocks is True
                else []
            ),
            lambda: (
                [
                    "'offload' and 'stream_blocks' do not combine: stream_blocks already keeps the transformer off "
                    "the GPU; set offload=false"
                ]
                if self.offload and self.stream_blocks is True
                else []
            ),
            *(path_rule(name) for name in ("flow_path", "ae_path", "t5_path", "clip_path")),
            lambda: output_dir_problems(self.output_dir),
        )


def native_size(model: str) -> int:
    """The demos' default side: the model's training size (flux.util's ModelSpec.native_size; flux-mini draws
    texture far from its 128²), else FLUX.1's 1024²."""
    return MODELS[model].native_size or 1024


@dataclass
class SamplingConfig(BaseConfig):
    """Keys of every demo that samples images: size, steps and guidance, each null for the model's default."""

    DEFAULT_STEPS: ClassVar[int | None] = None  # this demo's steps when `steps` is null (None: the model's)

    width: int | None = field(
        default=None,
        metadata={
            "help": "image width in pixels (null: the model's native size, 1024; flux-mini 128)",
            "min": 16,
            "max": 4096,
            "multiple_of": 16,
        },
    )
    height: int | None = field(
        default=None,
        metadata={
            "help": "image height in pixels (null: the model's native size, 1024; flux-mini 128)",
            "min": 16,
            "max": 4096,
            "multiple_of": 16,
        },
    )
    steps: int | None = field(
        default=None,
        metadata={
            "help": "denoising steps (null: the demo's default: 15 for demo_1, demo_2 and generated edits, 50 for "
            "real-image edits, the model's for demo_0: dev 50, schnell 4, mini 20)",
            "min": 1,
            "max": 1000,
        },
    )
    guidance: float | None = field(
        default=None,
        metadata={
            "help": "distilled guidance (null: the model's default, dev 3.5; edits: 3.5 generated, 3.0 real); "
            "models without a guidance embedding (schnell, mini) ignore it and record null, unless their guidance is "
            "classifier-free (a flux-mini trained with caption dropout)",
            "min": 0,
            "max": 100,
        },
    )

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images."""
        native = native_size(self.model)
        return self.width or native, self.height or native

    @property
    def num_steps(self) -> int:
        return self.steps or self.DEFAULT_STEPS or MODELS[self.model].num_steps

    @property
    def guidance_value(self) -> float:
        """The guidance passed to the sampler (a model without guidance embedding ignores it)."""
        return MODELS[self.model].guidance if self.guidance is None else self.guidance


DEFAULT_PROMPT = (
    'a photo of a forest with mist swirling around the tree trunks. The word "FLUX" is painted over it in big, red '
    "brush strokes with visible texture"
)


@dataclass
class PromptsConfig(SamplingConfig):
    """Every prompt drawn with every seed (demo_0, demo_1)."""

    prompt: str | list[str] = field(default=DEFAULT_PROMPT, metadata={"help": "one prompt, or a list of prompts"})
    seed: int | list[int] = field(
        default=0,
        metadata={
            "help": "seed of the first image of each prompt (image i uses seed+i), or one seed per image",
            "min": 0,
        },
    )
    num_images: int = field(
        default=1,
        metadata={"help": "images per prompt (a list of seeds sets it to the list's length)", "min": 1, "max": 1000},
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed + i for i in range(self.num_images)]

    def check(self) -> list[str]:
        problems = super().check()
        if not self.prompts():
            problems.append("'prompt' is an empty list: give at least one prompt")
        if isinstance(self.seed, list) and not self.seed:
            problems.append("'seed' is an empty list: give at least one seed, or a single number")
        if len(set(self.seeds())) != len(self.seeds()):
            problems.append(f"'seed' repeats a seed ({self.seeds()}): the same seed would make the same image twice")
        return problems


def output_dir_problems(output_dir: str) -> list[str]:
    """The config problem of an output folder that is really a file (empty when fine)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        return [f"'output_dir' '{output_dir}' is a file, not a folder: choose another output_dir"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# The entry point of every demo


def _looks_like_override(arg: str) -> bool:
    return "=" in arg and not arg.endswith(".json") and not Path(arg).exists()


def run_demo(cls: type[C], main: Callable[[C], None], argv: list[str] | None = None, description: str = "") -> None:
    """Parse `config.json [key=value ...] [--print-config]`, load and validate the config, run `main(cfg)`.

    Without any argument it prints the usage and the shipped configs and exits with 2, so that a bare
    `python demo_0_test.py` never starts a large download; `key=value` overrides alone run on the defaults.
    Any UserError (from the config or raised later inside `main`) prints `error: <message>` to stderr and exits
    with status 2; Ctrl-C exits with 130.
    """
    prog = Path(sys.argv[0]).name if argv is None else None
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Any key of the config can be overridden on the command line as key=value (the value is read as "
        "JSON, else as a plain string), e.g. seed=7 'prompt=a red fox' 'layers=[0,1]'.",
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="config.json|key=value",
        help="the JSON config file, then overrides (overrides alone: the defaults plus them; "
        "FLUX.1-dev by default, a 24 GB download)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the full config as JSON (the defaults, or the given config with the overrides "
        "applied) with the meaning of every key, and exit",
    )
    args = parser.parse_args(argv)
    if not args.args and not args.print_config:
        parser.print_usage(sys.stderr)
        script = Path(sys.argv[0]).stem if argv is None else ""
        shipped = _shipped_configs(script)
        print(
            "give a config file (and key=value overrides), e.g.\n"
            + "".join(f"  python {sys.argv[0] if argv is None else parser.prog} {c}\n" for c in shipped)
            + "or key=value overrides alone to run on the defaults; "
            "--print-config lists every key, -h explains more",
            file=sys.stderr,
        )
        raise SystemExit(2)
    config, overrides = None, list(args.args)
    if overrides and not _looks_like_override(overrides[0]):
        config = overrides.pop(0)
    try:
        cfg = load_config(cls, config, overrides)
        if args.print_config:
            sys.stdout.write(config_json(cfg))
            sys.stdout.flush()
            raise SystemExit(0)
        main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted (outputs written so far are complete files)", file=sys.stderr)
        raise SystemExit(130) from None


def _shipped_configs(script: str) -> list[str]:
    """The configs of the repository's configs/ that belong to the demo `script` (e.g. "demo_0_test")."""
    root = Path(__file__).resolve().parents[1]
    found = sorted(p for p in (root / "configs").glob(f"**/{script or 'demo_'}*.json") if p.parent.name != "schema")
    try:
        return [str(p.relative_to(Path.cwd())) for p in found]
    except ValueError:  # run from elsewhere: absolute paths
        return [str(p) for p in found]


# ---------------------------------------------------------------------------------------------------------------
# JSON Schema of each demo's config, for editors (configs/schema/, each shipped config's "$schema")

# Each demo's config class, by module and name: imported only when schemas are written, wherever the class lives.
DEMO_CONFIGS = {
    "demo_0_test": ("stableflow.text2img", "Text2ImgConfig"),
    "demo_1_layer": ("stableflow.trajectory", "TrajectoryConfig"),
    "demo_2_skip": ("stableflow.sweep", "SkipConfig"),
    "demo_3_dino": ("stableflow.vitality", "DinoConfig"),
    "demo_4_edit": ("stableflow.edit", "EditConfig"),
    "demo_5_bench": ("stableflow.bench", "BenchConfig"),
}
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "configs" / "schema"


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is _NoneType:
        return {"type": "null"}
    if typing.get_origin(tp) is Literal:
        return {"enum": list(typing.get_args(tp))}
    if typing.get_origin(tp) is list:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0])}
    return {"anyOf": [_type_schema(a) for a in typing.get_args(tp)]}  # a union: _describe rejected anything else


def _field_schema(f: _Field) -> dict[str, Any]:
    """`f`'s type with its rules on every number or string it may hold (as `_convert` applies them)."""
    rules: dict[str, Any] = {}
    if "min" in f.meta:
        rules["minimum"] = f.meta["min"]
    if "max" in f.meta:
        rules["maximum"] = f.meta["max"]
    if "multiple_of" in f.meta:
        rules["multipleOf"] = f.meta["multiple_of"]
    strings = {"pattern": f"^(?:{f.meta['pattern']})$"} if "pattern" in f.meta else {}
    if "choices" in f.meta:
        strings["enum"] = rules["enum"] = list(f.meta["choices"])

    def add(schema: dict[str, Any]) -> dict[str, Any]:
        if "anyOf" in schema:
            return {"anyOf": [add(s) for s in schema["anyOf"]]}
        if schema.get("type") == "array":
            return {**schema, "items": add(schema["items"])}
        if schema.get("type") in ("integer", "number"):
            return {**schema, **rules}
        if schema.get("type") == "string":
            return {**schema, **strings}
        return schema

    return {"description": _field_help(f), **add(_type_schema(f.type)), "default": _copy(f.default)}


def json_schema(cls: type, title: str) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of config class `cls`: what an editor can check before `load_config` does
    (types, ranges, choices, patterns; not the cross-field rules). Keys starting with "_" are comments."""
    fields = _schema(cls)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "description": (cls.__doc__ or "").strip().split("\n")[0],
        "type": "object",
        "properties": {"$schema": {"type": "string"}, **{f.name: _field_schema(f) for f in fields}},
        "patternProperties": {"^_": {}},
        "additionalProperties": False,
    }


def demo_schemas() -> dict[str, str]:
    """Each demo's schema file name and its text, as `--write-schemas` writes them."""
    import importlib

    out = {}
    for demo, (module, name) in DEMO_CONFIGS.items():
        cls = getattr(importlib.import_module(module), name)
        out[f"{demo}.schema.json"] = (
            json.dumps(json_schema(cls, f"{demo}.py config"), indent=2, ensure_ascii=False) + "\n"
        )
    return out


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    from .io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in demo_schemas().items():
        atomic_write_text(folder / name, text)
        written.append(folder / name)
    return written


def load_models_for(cfg: BaseConfig) -> FluxModels:
    """The models a demo's config asks for (its model, dtype, device, offload, speed options and local paths).

    The config's "auto" speed/memory values are replaced by the ones chosen for this device, so that the run.json
    or manifest written from it records what ran."""
    from flux.accel import AccelOptions
    from flux.pipeline import load_models, resolve_device, resolve_dtype

    models = load_models(
        cfg.model,
        resolve_device(cfg.device),
        resolve_dtype(cfg.dtype),
        offload=cfg.offload,
        flow_path=cfg.flow_path,
        ae_path=cfg.ae_path,
        t5_path=cfg.t5_path,
        clip_path=cfg.clip_path,
        accel=AccelOptions(cfg.compile, cfg.attention, cfg.fp8, cfg.stream_blocks, cfg.resident_gb, cfg.fuse_gelu),
    )
    for key in ("compile", "fuse_gelu", "stream_blocks", "resident_gb"):
        setattr(cfg, key, getattr(models.accel, key))
    return models


if __name__ == "__main__":  # python -m stableflow.config --write-schemas
    if sys.argv[1:] != ["--write-schemas"]:
        raise SystemExit("usage: python -m stableflow.config --write-schemas   (writes configs/schema/*.schema.json)")
    for written in write_schemas():
        print(written)
