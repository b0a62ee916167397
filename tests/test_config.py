"""The config layer: every kind of bad input gets its message, all at once; overrides; --print-config; run_demo."""

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from flux.errors import UserError
from flux.pipeline import resolve_device, resolve_dtype
from flux.util import configs
from stableflow.config import (
    BaseConfig,
    ConfigError,
    check_rules,
    config_json,
    config_to_dict,
    default_config_json,
    load_config,
    run_demo,
)

# The model names as the message lists them (the list grows with flux.util's registry).
MODELS = ", ".join(json.dumps(m) for m in configs)  # flux.util's registry


@dataclass
class ExampleConfig(BaseConfig):
    prompt: str | list[str] = field(default="a cat", metadata={"help": "one prompt or a list"})
    width: int = field(default=1024, metadata={"help": "image width", "min": 16, "max": 4096, "multiple_of": 16})
    height: int = field(default=1024, metadata={"help": "image height", "min": 16, "max": 4096, "multiple_of": 16})
    steps: int = field(default=15, metadata={"help": "denoising steps", "min": 1, "max": 1000})
    guidance: float = field(default=3.5, metadata={"help": "guidance", "min": 0.0})
    seed: int | None = field(default=None, metadata={"help": "seed; null: random"})
    layers: list[int] = field(default_factory=lambda: [0, 1, 17, 18], metadata={"min": 0, "max": 56})
    sampler: Literal["euler", "heun"] = "euler"
    style: str = field(default="photo", metadata={"choices": ["photo", "sketch"]})
    save_steps: bool = False

    def check(self) -> list[str]:
        problems = super().check()
        if self.model == "flux-schnell" and self.steps > 10:
            problems.append(f"flux-schnell needs at most 10 steps, got {self.steps}: lower 'steps'")
        return problems


def write(tmp_path: Path, content: str | dict, name: str = "cfg.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def problems_of(path, overrides=(), cls=ExampleConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    assert isinstance(info.value, UserError)
    return info.value.problems


# --- good input --------------------------------------------------------------------------------------------------


def test_schema_key_is_accepted_and_ignored(tmp_path):
    cfg = load_config(ExampleConfig, write(tmp_path, {"$schema": "schema/demo_0_test.schema.json", "steps": 3}))
    assert cfg == ExampleConfig(steps=3)


def test_file_values_are_typed_and_defaults_fill_the_rest(tmp_path):
    cfg = load_config(
        ExampleConfig,
        write(
            tmp_path,
            {
                "width": 512,
                "guidance": 4,
                "prompt": ["a", "b"],
                "seed": None,
                "_comment": "keys starting with _ are ignored",
            },
        ),
    )
    assert cfg.width == 512 and cfg.height == 1024 and cfg.prompt == ["a", "b"] and cfg.seed is None
    assert cfg.guidance == 4.0 and isinstance(cfg.guidance, float)  # an integer is accepted for a float
    assert cfg.model == "flux-dev" and cfg.dtype == "bf16" and cfg.device == "auto" and cfg.output_dir == "outputs"


def test_none_path_means_defaults_plus_overrides():
    assert load_config(ExampleConfig, None) == ExampleConfig()
    assert load_config(ExampleConfig, None, ["steps=4"]).steps == 4


def test_overrides_parse_json_then_fall_back_to_string(tmp_path):
    path = write(tmp_path, {"seed": 1, "prompt": "from file"})
    cfg = load_config(
        ExampleConfig,
        path,
        ["seed=7", "prompt=a cat on a mat", "layers=[0, 1]", "save_steps=true", "guidance=2", "device=cuda:1"],
    )
    assert (cfg.seed, cfg.prompt, cfg.layers, cfg.save_steps, cfg.guidance) == (7, "a cat on a mat", [0, 1], True, 2.0)
    assert cfg.device == "cuda:1"
    # "123" is valid JSON (an integer) but the field wants a string: the plain string is used
    assert load_config(ExampleConfig, path, ["prompt=123"]).prompt == "123"
    assert load_config(ExampleConfig, path, ['prompt=["x", "y"]']).prompt == ["x", "y"]
    assert load_config(ExampleConfig, path, ["seed=null"]).seed is None
    assert load_config(ExampleConfig, path, ["output_dir=runs/a=b"]).output_dir == "runs/a=b"


def test_check_hook_adds_cross_field_problems(tmp_path):
    assert problems_of(write(tmp_path, {"model": "flux-schnell", "steps": 20})) == [
        "flux-schnell needs at most 10 steps, got 20: lower 'steps'"
    ]
    # a rule runs whenever the fields it needs are valid: a wrong width does not hide it ...
    assert problems_of(write(tmp_path, {"model": "flux-schnell", "steps": 20, "width": 100})) == [
        "'width' must be a multiple of 16, got 100 (nearest: 96 or 112)",
        "flux-schnell needs at most 10 steps, got 20: lower 'steps'",
    ]
    # ... and never runs on a half-valid value: a wrong steps is reported once, by its own rule
    assert problems_of(write(tmp_path, {"model": "flux-schnell", "steps": "20"})) == [
        """'steps' must be an integer, got "20" (a string)"""
    ]


def test_rules_run_whenever_the_fields_they_need_are_valid(tmp_path):
    @dataclass
    class Ranged(BaseConfig):
        layers: list[int] = field(default_factory=list, metadata={"min": 0})
        steps: int = field(default=4, metadata={"min": 1})

        def check(self) -> list[str]:  # the range depends on the model: a rule, not field metadata
            return super().check() + check_rules(
                lambda: [f"'layers' {bad} out of range 0..5" for bad in [[i for i in self.layers if i > 5]] if bad],
                lambda: ["flux-tiny takes at most 8 steps"] if self.steps > 8 else [],
            )

    path = write(tmp_path, {"model": "flux-tiny", "layres": [0], "layers": [0, 99], "steps": "x", "offload": 1})
    assert problems_of(path, cls=Ranged) == [
        "unknown key 'layres' — did you mean 'layers'?",
        """'steps' must be an integer, got "x" (a string)""",
        "'offload' must be true or false, got 1",
        "'layers' [99] out of range 0..5",  # ran: model and layers are valid; the steps rule did not
    ]


def test_a_misspelt_key_and_an_out_of_range_layer_are_reported_together(tmp_path):
    from stableflow.config import DEMO_CONFIGS

    module, name = DEMO_CONFIGS["demo_2_skip"]
    cls = getattr(__import__(module, fromlist=[name]), name)
    problems = problems_of(write(tmp_path, {"model": "flux-tiny", "layers": [0, 99], "num_promts": 2}), cls=cls)
    assert problems[0] == "unknown key 'num_promts' — did you mean 'num_prompts'?"
    assert len(problems) == 2 and "99" in problems[1] and "out of range" in problems[1]


# --- bad input: every problem at once ---------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_naming_the_file(tmp_path):
    path = write(
        tmp_path,
        {
            "widht": 512,
            "steps": "15",
            "height": 1000,
            "guidance": -1,
            "layers": [0, "a"],
            "dtype": "bf61",
            "model": "flux-deb",
            "seed": 1.5,
            "save_steps": 1,
            "prompt": 5,
            "style": "sketchy",
            "device": "gpu",
            "sampler": "eulr",
            "width": 8,
            "offload": "yes",
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, path, ["seed=abc", "colour=red", "steps"])
    # the file's seed 1.5 is replaced by the override: only the override's problem is reported
    expected = [
        "unknown key 'widht' — did you mean 'width'?",
        "command-line override 'colour=red': unknown key 'colour' (--print-config lists every key)",
        "command-line override 'steps' must look like key=value (e.g. seed=7)",
        """'steps' must be an integer, got "15" (a string)""",
        "'height' must be a multiple of 16, got 1000 (nearest: 992 or 1008)",
        "'guidance' must be at least 0.0, got -1",
        """'layers[1]' must be an integer, got "a" (a string)""",
        """'dtype' must be one of "bf16", "fp16", "fp32", got "bf61" (a string) — did you mean "bf16"?""",
        f"""'model' must be one of {MODELS}, got "flux-deb" (a string) — did you mean "flux-dev"?""",
        """command-line override 'seed=abc': 'seed' must be an integer or null, got "abc" (a string)""",
        "'save_steps' must be true or false, got 1",
        "'prompt' must be a string or a list of strings, got 5",
        """'style' must be one of "photo", "sketch", got "sketchy" (a string) — did you mean "sketch"?""",
        """'device' has an invalid value "gpu" (a string): expected auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps""",
        """'sampler' must be one of "euler", "heun", got "eulr" (a string) — did you mean "euler"?""",
        "'width' must be at least 16, got 8",
        "'width' must be a multiple of 16, got 8 (nearest: 16)",
        """'offload' must be true or false, got "yes" (a string)""",
    ]
    assert info.value.problems == expected
    message = str(info.value)
    assert message.startswith(f"config file '{path}' has {len(expected)} problems:\n")
    assert all(f"\n  - {p}" in message for p in expected)


def test_type_messages_for_bool_int_float_and_lists(tmp_path):
    assert problems_of(write(tmp_path, {"steps": True, "guidance": "3.5", "layers": 3, "width": 512.5})) == [
        "'steps' must be an integer, got true (a true/false value)",
        """'guidance' must be a number, got "3.5" (a string)""",
        "'layers' must be a list of integers, got 3",
        "'width' must be an integer, got 512.5 (a number with a fraction)",
    ]
    # 512.0 is an integer to JSON and to the JSON Schema an editor checks against: the loader agrees.
    cfg = load_config(ExampleConfig, write(tmp_path, {"width": 512.0, "layers": [1.0]}))
    assert (cfg.width, cfg.layers) == (512, [1]) and type(cfg.width) is int
    assert problems_of(write(tmp_path, {"prompt": ["ok", 2], "layers": [0, 57, -1], "steps": None})) == [
        "'prompt[1]' must be a string, got 2",
        "'layers[1]' must be at most 56, got 57",
        "'layers[2]' must be at least 0, got -1",
        "'steps' must be an integer, got null",
    ]


def test_unknown_keys_suggest_the_closest_name(tmp_path):
    assert problems_of(write(tmp_path, {"num_steps": 4, "Width": 512, "output-dir": "x", "zzz": 1})) == [
        "unknown key 'num_steps' — did you mean 'steps'?",
        "unknown key 'Width' — did you mean 'width'?",
        "unknown key 'output-dir' — did you mean 'output_dir'?",
        "unknown key 'zzz' (--print-config lists every key)",
    ]


@pytest.mark.parametrize(
    "text, where, hint",
    [
        ('{\n  "width": 512,\n  "steps": 4,\n}\n', "line 4, column 1", "a trailing comma before '}'"),
        ('{\n  "width": 512\n  "steps": 4\n}\n', "line 3, column 3", "a missing comma"),
        ("{\n  'width': 512\n}\n", "line 2, column 3", "double quotes"),
        ('{"layers": [0, 1,]}', "line 1, column 18", "a trailing comma before ']'"),
        ('{"width": 512', "line 1, column 14", ""),
    ],
)
def test_broken_json_names_line_and_column(tmp_path, text, where, hint):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, path)
    message = str(info.value)
    assert message.startswith(f"config file '{path}': broken JSON at {where}: ")
    assert hint in message
    line, col = (int(n) for n in where.removeprefix("line ").split(", column "))
    shown = text.splitlines()[line - 1] if line <= len(text.splitlines()) else ""
    assert f"\n      {shown}\n      {' ' * (col - 1)}^" in message  # the offending line with a caret


def test_an_override_replaces_a_bad_file_value(tmp_path):
    path = write(tmp_path, {"width": 100, "seed": "x"})
    assert load_config(ExampleConfig, path, ["width=96", "seed=1", "seed=2"]).width == 96
    assert load_config(ExampleConfig, path, ["width=96", "seed=1", "seed=2"]).seed == 2  # the last one wins
    assert problems_of(path, ["width=96"]) == ["""'seed' must be an integer or null, got "x" (a string)"""]


def test_broken_json_and_bad_overrides_are_reported_together(tmp_path):
    problems = problems_of(write(tmp_path, "{"), ["wdth=5", "steps=x"])
    assert problems[0].startswith("broken JSON at line 1, column 2: Expecting property name")
    assert problems[1:] == [
        "command-line override 'wdth=5': unknown key 'wdth' — did you mean 'width'?",
        """command-line override 'steps=x': 'steps' must be an integer, got "x" (a string)""",
    ]


def test_file_problems(tmp_path):
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", {}, "demo_0_test.json")
    assert problems_of(tmp_path / "configs") == [
        "is a folder, not a file: pass the path of a .json config file (it holds: demo_0_test.json)"
    ]
    assert problems_of(tmp_path / "configs" / "demo_0_tset.json") == [
        f"no such file — did you mean '{tmp_path / 'configs' / 'demo_0_test.json'}'?"
    ]
    assert problems_of(tmp_path / "nowhere" / "x.json") == ["no such file"]
    assert problems_of(write(tmp_path, " \n")) == [
        'is empty: write a JSON object such as {"seed": 0}, or print a full one with --print-config'
    ]
    assert problems_of(write(tmp_path, "[1, 2]")) == [
        'must hold one JSON object {"key": value, ...}, not [1, 2] (a list)'
    ]
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert "is not a UTF-8 text file" in problems_of(tmp_path / "bin.json")[0]
    # a byte-order mark (some Windows editors) is fine
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"steps": 3}')
    assert load_config(ExampleConfig, tmp_path / "bom.json").steps == 3


def test_base_config_checks_paths_and_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    problems = problems_of(
        write(
            tmp_path,
            {
                "flow_path": str(tmp_path / "missing.safetensors"),
                "ae_path": str(tmp_path / "file"),
                "output_dir": str(tmp_path / "file"),
            },
        )
    )
    assert problems == [
        f"'flow_path' points to '{tmp_path / 'missing.safetensors'}', which does not exist "
        "(fix the path, or set it to null to download the weights)",
        f"'output_dir' '{tmp_path / 'file'}' is a file, not a folder: choose another output_dir",
    ]


def test_class_mistakes_are_type_errors_not_user_errors():
    @dataclass
    class NoDefault:
        x: int

    @dataclass
    class BadMeta:
        x: int = field(default=1, metadata={"mni": 0})

    @dataclass
    class BadDefault:
        x: int = field(default=8, metadata={"multiple_of": 16})

    @dataclass
    class BadType:
        x: dict = field(default_factory=dict)

    for cls, words in [
        (NoDefault, "needs a default"),
        (BadMeta, "unknown metadata"),
        (BadDefault, "violates its own rules"),
        (BadType, "unsupported config field type"),
    ]:
        with pytest.raises(TypeError, match=words):
            load_config(cls, None)


# --- printing the config ----------------------------------------------------------------------------------------


def test_default_config_json_loads_back_and_explains_every_key(tmp_path):
    text = default_config_json(ExampleConfig)
    data = json.loads(text)
    keys = list(config_to_dict(ExampleConfig()))
    assert list(data) == keys + ["_help"] and list(data["_help"]) == keys
    assert data["_help"]["width"] == "image width [integer; 16..4096; multiple of 16]"
    assert data["_help"]["device"].startswith("auto (cuda, then mps, then cpu)")
    assert '"layers": [0, 1, 17, 18],' in text  # short lists stay on one line
    assert load_config(ExampleConfig, write(tmp_path, text)) == ExampleConfig()


def test_config_to_dict_round_trips(tmp_path):
    cfg = load_config(ExampleConfig, None, ['prompt=["a"]', "seed=3", "model=flux-tiny"])
    data = config_to_dict(cfg)
    assert data["prompt"] == ["a"] and data["seed"] == 3 and data["model"] == "flux-tiny"
    data["prompt"].append("b")  # a copy: the config is untouched
    assert cfg.prompt == ["a"]
    assert load_config(ExampleConfig, write(tmp_path, config_json(cfg, with_help=False))) == cfg


# --- devices and dtypes -----------------------------------------------------------------------------------------


def test_resolve_dtype():
    import torch

    assert [resolve_dtype(n) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(UserError, match="use bf16, fp16 or fp32"):
        resolve_dtype("float8")


def test_resolve_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1", "mps"):
        with pytest.raises(UserError, match=f"device={name} was asked for but .*: set device=auto or device=cpu"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"only 2 CUDA GPU\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")


# --- the demos' entry point -------------------------------------------------------------------------------------


def writing_main(calls):
    """A demo body that writes into its output folder, so tests can see that nothing was written on error."""

    def main(cfg: ExampleConfig) -> None:
        calls.append(cfg)
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "image.png").write_bytes(b"png")

    return main


def run(argv, main):
    with pytest.raises(SystemExit) as info:
        run_demo(ExampleConfig, main, argv)
    return info.value.code


def test_run_demo_runs_main_with_config_and_overrides(tmp_path):
    calls = []
    out = tmp_path / "out"
    assert (
        run_demo(
            ExampleConfig,
            writing_main(calls),
            [str(write(tmp_path, {"steps": 3, "output_dir": str(out)})), "seed=9", "prompt=a dog"],
        )
        is None
    )
    assert (calls[0].steps, calls[0].seed, calls[0].prompt) == (3, 9, "a dog")
    assert (out / "image.png").exists()
    # without a config file the first positional is already an override
    calls.clear()
    run_demo(ExampleConfig, writing_main(calls), [f"output_dir={tmp_path / 'out2'}", "steps=2"])
    assert calls[0].steps == 2


def test_run_demo_bad_config_exits_2_with_message_and_writes_nothing(tmp_path, capsys):
    calls = []
    out = tmp_path / "out"
    path = write(tmp_path, {"output_dir": str(out), "widht": 512, "steps": "4"})
    assert run([str(path), "seed=x"], writing_main(calls)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file '{path}' has 3 problems:\n")
    assert "unknown key 'widht' — did you mean 'width'?" in err and """'steps' must be an integer""" in err
    assert "command-line override 'seed=x'" in err
    assert calls == [] and not out.exists()


def test_run_demo_user_error_inside_main_exits_2(tmp_path, capsys):
    def main(cfg):
        raise UserError("the checkpoint is truncated: download it again")

    assert run([f"output_dir={tmp_path}"], main) == 2
    assert capsys.readouterr().err == "error: the checkpoint is truncated: download it again\n"


def test_run_demo_ctrl_c_exits_130(capsys):
    def main(cfg):
        raise KeyboardInterrupt

    assert run(["seed=1"], main) == 130
    assert "interrupted" in capsys.readouterr().err


def test_run_demo_other_exceptions_are_bugs_and_propagate():
    def main(cfg):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_demo(ExampleConfig, main, ["seed=1"])


def test_run_demo_without_arguments_prints_usage_and_the_shipped_configs(capsys):
    calls = []
    assert run([], writing_main(calls)) == 2 and calls == []  # no silent start of a FLUX.1-dev download
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "give a config file" in err and "key=value overrides alone" in err
    assert "configs/tiny/demo_0_test.json" in err and "configs/demo_4_edit_real.json" in err


def test_print_config_prints_loadable_json_and_runs_nothing(tmp_path, capsys):
    calls = []
    assert run(["--print-config"], writing_main(calls)) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["_help"]["steps"] == "denoising steps [integer; 1..1000]"
    assert load_config(ExampleConfig, write(tmp_path, printed, "printed.json")) == ExampleConfig()
    # with a config and overrides: the resolved config
    path = write(tmp_path, {"steps": 5})
    assert run([str(path), "seed=3", "--print-config"], writing_main(calls)) == 0
    resolved = load_config(ExampleConfig, write(tmp_path, capsys.readouterr().out, "resolved.json"))
    assert (resolved.steps, resolved.seed) == (5, 3) and calls == []
    # a bad config is still an error
    assert run([str(write(tmp_path, {"steps": 0}, "bad.json")), "--print-config"], writing_main(calls)) == 2
    assert "'steps' must be at least 1, got 0" in capsys.readouterr().err


def test_demo_script_as_a_subprocess(tmp_path, repo_root, run_script):
    """The real thing: a script calling run_demo, its exit status, stderr and output folder."""
    script = tmp_path / "demo_example.py"
    script.write_text(
        textwrap.dedent("""
        from dataclasses import dataclass, field
        from pathlib import Path
        from stableflow.config import BaseConfig, run_demo

        @dataclass
        class Config(BaseConfig):
            width: int = field(default=64, metadata={"min": 16, "multiple_of": 16})

        def main(cfg):
            Path(cfg.output_dir).mkdir()
            (Path(cfg.output_dir) / "done.txt").write_text(str(cfg.width))

        if __name__ == "__main__":
            run_demo(Config, main, description="example demo")
    """)
    )
    out = tmp_path / "out"
    bad = write(tmp_path, {"width": 100, "output_dir": str(out)})
    bare = dict(env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"}, inherit_env=False, timeout=60)
    result = run_script(script, bad, **bare)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == f"error: config file '{bad}': 'width' must be a multiple of 16, got 100 (nearest: 96 or 112)\n"
    )
    assert result.stdout == "" and not out.exists()
    result = run_script(script, bad, "width=32", **bare)
    assert result.returncode == 0, result.stderr
    assert (out / "done.txt").read_text() == "32"


# --- "auto" speed and memory options ----------------------------------------------------------------------------


def fake_gpu(monkeypatch, capability=(9, 0), free_gib=79.0):
    import torch
    import torch.utils._triton

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)


def test_auto_speed_options_follow_device_dtype_and_capability(monkeypatch):
    import torch

    from flux.accel import AccelOptions, describe, resolve_accel
    from flux.util import configs

    auto = AccelOptions("auto", "auto", False, "auto", "auto", "auto")
    dev, t5 = configs["flux-dev"].params, 4_885_000_000 * 2
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch)
    got = resolve_accel(auto, cuda, torch.bfloat16, dev, t5)
    assert (got.compile, got.fuse_gelu, got.fp8, got.stream_blocks, got.resident_gb) == (True, True, False, False, 0.0)
    assert describe(got) == "speed options: compile on, fuse_gelu on (auto: CUDA bf16 sm_90)"
    assert got.check() == [] and auto.check() != []  # only resolved options reach accelerate
    for device, dtype, cap in [
        ("cpu", torch.bfloat16, (9, 0)),
        ("mps", torch.bfloat16, (9, 0)),
        ("cuda", torch.float32, (9, 0)),
        ("cuda", torch.float16, (9, 0)),
        ("cuda", torch.bfloat16, (7, 5)),
    ]:
        fake_gpu(monkeypatch, capability=cap)
        got = resolve_accel(auto, torch.device(device), dtype, dev, t5)
        assert (got.compile, got.fuse_gelu, got.stream_blocks) == (False, False, False), (device, dtype, cap)
    fake_gpu(monkeypatch)  # explicit values win
    got = resolve_accel(AccelOptions(False, "auto", False, "auto", "auto", True), cuda, torch.bfloat16, dev, t5)
    assert (got.compile, got.fuse_gelu) == (False, True)


def test_auto_memory_options_stream_on_small_gpus(monkeypatch):
    import torch

    from flux.accel import AccelOptions, resolve_accel, transformer_bytes
    from flux.util import configs

    auto = AccelOptions("auto", "auto", False, "auto", "auto", "auto")
    dev, t5 = configs["flux-dev"].params, 4_885_000_000 * 2
    cuda = torch.device("cuda")
    assert abs(transformer_bytes(dev, torch.bfloat16) / 1e9 - 23.8) < 0.1  # 11.9 B parameters, as the checkpoint
    fake_gpu(monkeypatch, free_gib=23.5)  # a 24 GB card: the README's lossless setting
    got = resolve_accel(auto, cuda, torch.bfloat16, dev, t5)
    assert (got.stream_blocks, got.resident_gb, got.compile, got.fuse_gelu) == (True, 15.0, False, True)
    assert "stream_blocks on: 23.5 GiB free" in got.reason
    fake_gpu(monkeypatch, free_gib=31.0)  # more free memory, more blocks stay
    assert resolve_accel(auto, cuda, torch.bfloat16, dev, t5).resident_gb == 22.5
    fake_gpu(monkeypatch, free_gib=6.0)
    assert resolve_accel(auto, cuda, torch.bfloat16, dev, t5).resident_gb == 0.0
    fake_gpu(monkeypatch, free_gib=23.5)
    explicit = AccelOptions("auto", "auto", False, True, "auto", "auto")  # stream_blocks=true, resident_gb auto
    assert resolve_accel(explicit, cuda, torch.bfloat16, dev, t5).resident_gb == 15.0  # as many as fit, not 0
    assert AccelOptions(resident_gb="lots").check() == ["resident_gb must be a number of GiB or 'auto', got 'lots'"]
    fake_gpu(monkeypatch, free_gib=40.0)  # fits: resident path
    assert resolve_accel(auto, cuda, torch.bfloat16, dev, t5).stream_blocks is False
    fake_gpu(monkeypatch, free_gib=23.5)  # explicit settings win; offload, fp8 and compile=true decide memory
    assert (
        resolve_accel(
            AccelOptions("auto", "auto", False, "auto", 12, "auto"), cuda, torch.bfloat16, dev, t5
        ).resident_gb
        == 12
    )
    assert resolve_accel(
        AccelOptions("auto", "auto", False, False, "auto", "auto"), cuda, torch.bfloat16, dev, t5
    ).compile
    for options, offload in [
        (AccelOptions("auto", "auto", True, "auto", "auto", "auto"), False),
        (AccelOptions(True, "auto", False, "auto", "auto", "auto"), False),
        (auto, True),
    ]:
        assert resolve_accel(options, cuda, torch.bfloat16, dev, t5, offload=offload).stream_blocks is False


def test_demo_config_defaults_to_auto_and_records_what_ran(tmp_path, capsys):
    from stableflow.config import load_models_for

    cfg = load_config(ExampleConfig, None, ["model=flux-tiny", "device=cpu", "dtype=fp32"])
    assert (cfg.compile, cfg.fuse_gelu, cfg.stream_blocks, cfg.resident_gb) == ("auto",) * 4
    models = load_models_for(cfg)
    assert models.accel.as_dict()["compile"] is False and "auto: off on cpu" in models.accel.reason
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("speed options")] == [
        "speed options: compile off, fuse_gelu off (auto: off on cpu)"
    ]
    assert (cfg.compile, cfg.fuse_gelu, cfg.stream_blocks, cfg.resident_gb) == (False, False, False, 0.0)
    assert config_to_dict(cfg)["compile"] is False  # run.json gets the resolved value
