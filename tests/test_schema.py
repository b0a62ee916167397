"""The JSON Schemas in configs/schema: generated from the config classes, and every shipped config passes its own."""

import json
from pathlib import Path

import jsonschema
import pytest

from stableflow.config import DEMO_CONFIGS, SCHEMA_DIR, demo_schemas, load_config

CONFIGS = SCHEMA_DIR.parent
SHIPPED = sorted(CONFIGS.glob("*.json")) + sorted(p for sub in ("tiny", "mini") for p in (CONFIGS / sub).glob("*.json"))


def schema_of(config: Path) -> tuple[str, dict]:
    """The demo a shipped config belongs to and the schema its "$schema" names."""
    ref = json.loads(config.read_text())["$schema"]
    schema = (config.parent / ref).resolve()
    assert schema.parent == SCHEMA_DIR, f"{config} names {ref}, not a file of configs/schema"
    return schema.name.removesuffix(".schema.json"), json.loads(schema.read_text())


def test_committed_schemas_equal_freshly_generated_ones():
    fresh = demo_schemas()
    assert sorted(fresh) == sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    for name, text in fresh.items():
        assert (SCHEMA_DIR / name).read_text() == text, f"{name} is stale: python -m stableflow.config --write-schemas"


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS.parent)))
def test_every_shipped_config_names_and_passes_its_schema(config):
    text = config.read_text()
    assert text.startswith('{\n  "$schema": '), "the schema comes first, where an editor looks for it"
    demo, schema = schema_of(config)
    assert config.stem.removesuffix("_real").removesuffix("_ssim") == demo  # a variant names itself after the demo
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(text))
    # and the loader ignores "$schema"
    module, name = DEMO_CONFIGS[demo]
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert load_config(cls, config) is not None


def errors(schema: dict, data: dict) -> list[str]:
    """What the schema says about `data`, inside "anyOf" the reasons other than a mismatched alternative type."""

    def leaves(e) -> list[str]:
        if not e.context:
            return [e.message]
        return [m for c in e.context for m in leaves(c) if " is not of type " not in m and " is not one of " not in m]

    return sorted(m for e in jsonschema.Draft202012Validator(schema).iter_errors(data) for m in leaves(e))


def test_schema_rejects_typos_and_out_of_range_values():
    _, schema = schema_of(CONFIGS / "demo_2_skip.json")
    assert (
        errors(
            schema,
            {
                "$schema": "x",
                "_comment": "ok",
                "width": 512,
                "layers": [0, 56],
                "compile": "auto",
                "resident_gb": 15,
                "stream_blocks": True,
            },
        )
        == []
    )
    assert errors(schema, {"widht": 512}) == ["'widht' does not match any of the regexes: '^_'"]  # not a known key
    assert errors(schema, {"layers": [0, -1]}) == ["-1 is less than the minimum of 0"]
    assert errors(schema, {"width": 1000}) == ["1000 is not a multiple of 16"]
    assert errors(schema, {"steps": 0}) == ["0 is less than the minimum of 1"]
    assert errors(schema, {"dtype": "bf61"}) == ["'bf61' is not one of ['bf16', 'fp16', 'fp32']"]
    assert errors(schema, {"device": "gpu"}) == ["'gpu' does not match '^(?:auto|cpu|mps|cuda(:\\\\d+)?)$'"]
    assert errors(schema, {"resident_gb": -1}) == ["-1 is less than the minimum of 0"]
    assert len(jsonschema.Draft202012Validator(schema).iter_errors({"compile": "yes"}).__next__().context) == 2
    _, schema = schema_of(CONFIGS / "demo_4_edit_real.json")
    assert errors(schema, {"solver": "rf-solver"}) == []
    assert errors(schema, {"solver": "rf_solver"}) == ["'rf_solver' is not one of ['euler', 'rf-solver', 'fireflow']"]


def bounded_fields():
    import importlib

    from stableflow.config import _schema

    for demo, (module, name) in DEMO_CONFIGS.items():
        cls = getattr(importlib.import_module(module), name)
        for f in _schema(cls):
            for bound in ("min", "max"):
                if bound in f.meta:
                    yield pytest.param(cls, f, bound, id=f"{demo}-{f.name}-{bound}")


@pytest.mark.parametrize("cls,f,bound", bounded_fields())
def test_loader_and_schema_agree_on_every_bounded_field_at_and_beyond_its_bounds(cls, f, bound):
    """At the bound, just outside it (by the field's step: its multiple, 1 for an integer, a little for a number),
    and at the bound written as a float (4096.0: an integer to JSON and to its Schema), both validators decide
    alike."""
    import typing

    from stableflow.config import _check_value, json_schema

    validator = jsonschema.Draft202012Validator(json_schema(cls, "t"))
    members = [a for a in typing.get_args(f.type) if a is not type(None)] or [f.type]
    only_lists = all(typing.get_origin(a) is list for a in members) or typing.get_origin(f.type) is list
    numbers = [a for m in members for a in (typing.get_args(m) if typing.get_origin(m) is list else [m])]
    step = f.meta.get("multiple_of", 1e-3 if float in numbers else 1) * (-1 if bound == "min" else 1)
    b = f.meta[bound]
    for value, valid in [(b, True), (b + step, False), (float(b), True)]:
        data = [value] if only_lists else value
        assert (not _check_value(f, data)) == valid, (value, _check_value(f, data))
        assert validator.is_valid({f.name: data}) == valid, value
