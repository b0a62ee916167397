"""The browser app's work, without its page (demo_gr.py draws that): the models loaded once per process, one job on
them at a time, and every request mapped to the config of the demo that makes the same picture.

A request becomes a demo config (Text2ImgConfig, EditConfig, TrajectoryConfig) through the demos' own config layer,
so bad input gets the demos' messages; the run calls the library as the demo does, with a step callback that reports
progress and stops a cancelled job; a result is saved by writing the demo's files with the demo's metadata and the
config JSON that reproduces it. This module is the one place that knows how the app's results map to the demos'
records: when the demos' record code changes (stableflow.runs), only the functions under "saving" follow it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from flux.errors import UserError
from flux.model import layer_name
from flux.util import model_spec

from .config import BaseConfig, ConfigError, config_json, load_config
from .edit import (
    EditConfig,
    RealImage,
    edit_chunks,
    edit_file,
    edit_generated,
    edit_real,
    edit_settings,
    pil_to_tensor,
    reference_files,
)
from .io import atomic_write_text, save_png, tensor_to_pil
from .runs import settings_of
from .text2img import Text2ImgConfig, image_name
from .trajectory import TrajectoryConfig

if TYPE_CHECKING:
    from flux.pipeline import FluxModels
    from flux.sampling import Step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = {"flux-mini": "mini", "flux-tiny": "tiny"}  # their shipped configs' folder, under configs/ and outputs/
# The Edit tab's examples, (source prompt, edit prompts, seed): for flux-mini, captions of its world (mini.world: one
# to three objects) edited as mini.edits does (recolour one object, change the background), on seeds whose
# reference shows its caption.
EDIT_EXAMPLES = {
    "flux-mini": [
        (
            "a blue star and an orange star on a gray background",
            [
                "a blue star and a yellow star on a gray background",
                "a blue star and an orange star on a white background",
            ],
            0,
        ),
        (
            "a red circle in the center and a large orange star on a gray background",
            [
                "a green circle in the center and a large orange star on a gray background",
                "a red circle in the center and a large orange star on a black background",
            ],
            1,
        ),
    ]
}


def default_model() -> str:
    """FLUX.1-dev where a CUDA GPU is present, else flux-mini: its weights ship with the repository."""
    import torch

    return "flux-dev" if torch.cuda.is_available() else "flux-mini"


@dataclass
class AppConfig:
    """The process's settings (demo_gr.py's flags): every job runs on this model, device and dtype."""

    model: str
    device: str = "auto"
    offload: bool = False
    output_dir: str | None = None  # None: outputs/<mini|tiny>/app beside the shipped configs' outputs, else outputs/app
    dtype: str = field(default="", init=False)  # fp32 on a CPU (as the CPU configs run), else bf16

    def __post_init__(self):
        from flux.pipeline import resolve_device

        model_spec(self.model)  # an unknown name fails here, with the registry's message
        self.dtype = "fp32" if resolve_device(self.device).type == "cpu" else "bf16"
        if self.output_dir is None:
            self.output_dir = str(Path("outputs", SHORT.get(self.model, ""), "app"))

    def shipped(self, cls: type, demo: str) -> Any:
        """The repository's config of `demo` for this model (configs/mini/demo_4_edit.json, ...), else the demo's
        defaults: the values the page starts with."""
        path = CONFIGS / SHORT.get(self.model, "") / f"{demo}.json"
        cfg = load_config(cls, path) if path.is_file() else cls()
        return cfg if cfg.model == self.model else cls(model=self.model)

    def base(self) -> dict[str, Any]:
        """The keys every demo config shares, as this process runs them."""
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "offload": self.offload}

    def load(self) -> FluxModels:
        """The models, as the demos load them (their speed and memory options on `auto`): once per process."""
        from .config import load_models_for

        return load_models_for(demo_config(BaseConfig, self.base()))


def demo_config(cls: type, values: dict[str, Any]) -> Any:
    """`values` as a validated config of `cls`, checked by the demos' config layer (the same messages); a
    ConfigError becomes a UserError listing the problems without naming a file the user never wrote."""
    with tempfile.TemporaryDirectory() as tmp:  # load_config reads a file: the values go through the same checks
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(values))
        try:
            return load_config(cls, path)
        except ConfigError as e:
            raise UserError("\n".join(e.problems)) from None


def parse_numbers(text: str, what: str) -> list[int]:
    """'0, 1 17' -> [0, 1, 17] (layers, or inject steps); an empty text is an empty list. Ranges are the configs'."""
    words = [w for w in re.split(r"[\s,;\[\]]+", text or "") if w]
    bad = [w for w in words if not re.fullmatch(r"-?\d+", w)]
    if bad:
        raise UserError(f"{what}: {', '.join(map(repr, bad))} is not a whole number: write numbers, e.g. 0, 1, 17")
    return [int(w) for w in words]


def layer_choices(model: str) -> list[tuple[str, int]]:
    """Every layer of the model with its readable name, for a checkbox list."""
    p = model_spec(model).params
    return [(f"{i}: {layer_name(i, p.depth)}", i) for i in range(p.depth + p.depth_single_blocks)]


# ----------------------------------------------------------------------------------------------- requests


@dataclass
class PictureForm:
    """One prompt's picture: the Generate and Layers tabs' fields (steps, guidance None: the model's defaults)."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int | None = None
    guidance: float | None = None


def generate_config(app: AppConfig, form: PictureForm) -> Text2ImgConfig:
    """demo_0's config of one picture."""
    return demo_config(Text2ImgConfig, app.base() | vars(form) | {"output_dir": app.output_dir})


@dataclass
class EditForm:
    """The edit tab's fields. `image` is an uploaded file (None: edit a generated reference); `layers` None takes
    the demo's default (demo_3's vital_layers.json for this model when found, else the release's)."""

    source_prompt: str
    edits: list[str]
    seed: int = 0
    width: int | None = None  # None: the model's native size, as the configs take it
    height: int | None = None
    image: str | None = None
    size: int | None = 1024
    steps: int | None = None
    guidance: float | None = None
    layers: list[int] | None = None
    inject_steps: list[int] | None = None
    nudge: float | None = None
    source_guidance: float | None = None


def edit_config(app: AppConfig, form: EditForm) -> tuple[EditConfig, str]:
    """demo_4's config of an edit request, and where its injection layers come from. The layers are always written
    out (the default ones too), so the config makes the same pictures wherever it is run from."""
    layers, source = (form.layers, "given") if form.layers is not None else default_layers(app)
    values = {
        "source_prompt": form.source_prompt,
        "edits": [e for e in form.edits if e.strip()],
        "seed": form.seed,
        "width": form.width,
        "height": form.height,
        "image": form.image,
        "size": form.size,
        "steps": form.steps,
        "guidance": form.guidance,
        "inject_steps": form.inject_steps,
        "output_dir": app.output_dir,
    }
    values |= {"vital_layers": layers, "vital_layers_file": None}
    values |= {k: v for k in ("nudge", "source_guidance") if (v := getattr(form, k)) is not None}
    return demo_config(EditConfig, app.base() | values), source


def default_layers(app: AppConfig) -> tuple[list[int], str]:
    """The injection layers demo_4 takes for this app's folders, and where they come from."""
    return EditConfig(model=app.model, output_dir=app.output_dir).injection_layers


def bypass_config(app: AppConfig, form: PictureForm, layers: list[int]) -> TrajectoryConfig:
    """demo_1's config of one prompt with `layers` bypassed at every step (its final image is the bypass result)."""
    values = vars(form) | {"skip_layers": layers, "output_dir": app.output_dir}
    return demo_config(TrajectoryConfig, app.base() | {k: v for k, v in values.items() if v is not None})


# ----------------------------------------------------------------------------------------------- jobs


class Cancelled(UserError):
    """A job stopped by its cancel button, between two steps; it wrote nothing."""


Report = Callable[[int, int, str], None]  # (steps done, steps in all, what is running)


@dataclass
class Job:
    """The running job: its owner (a browser session), progress, and the cancel flag its step callback checks."""

    owner: str
    total: int
    report: Report
    what: str = ""
    done: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)

    def step(self, step: Step | None = None) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"cancelled after {self.done} of {self.total} steps: nothing was written")
        self.done += 1
        self.report(self.done, self.total, self.what)

    def stage(self, what: str) -> None:
        self.what = what
        self.report(self.done, self.total, what)


class Jobs:
    """One job on the models at a time. The page's queue orders the jobs and shows each waiting one its place; the
    lock here is the guarantee, whatever calls in. `log` keeps every finished or stopped job, for the tests."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current: Job | None = None
        self.log: deque[tuple[Job, float, float]] = deque(maxlen=100)  # (job, start, end), time.monotonic seconds

    @contextmanager
    def run(self, owner: str, total: int, report: Report) -> Iterator[Job]:
        with self._lock:
            job = Job(owner, total, report)
            self.current, start = job, time.monotonic()
            try:
                yield job
            finally:
                self.current = None
                self.log.append((job, start, time.monotonic()))

    def cancel(self, owner: str) -> bool:
        """Stop `owner`'s running job at its next step; False when none of its jobs is running."""
        job = self.current
        if job is None or job.owner != owner:
            return False
        job.cancel.set()
        return True


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    """A finished run: the config that makes it again, its pictures by the demo's file names, and captions."""

    config: Any
    images: dict[str, Image.Image]
    captions: dict[str, str]
    plain: Result | None = None  # an edit run again without injection
    note: str = ""

    def gallery(self) -> list[tuple[Image.Image, str]]:
        return [(im, self.captions[n]) for n, im in self.images.items()]


def run_generate(models: FluxModels, jobs: Jobs, owner: str, cfg: Text2ImgConfig, report: Report) -> Result:
    with jobs.run(owner, cfg.num_steps, report) as job:
        job.stage("1 image")
        image = models.generate(
            [cfg.prompt], [cfg.seed], *cfg.image_size, cfg.num_steps, cfg.guidance_value, callback=job.step
        )
    name = image_name(0, cfg.seed)
    return Result(cfg, {name: tensor_to_pil(image[0])}, {name: f"seed {cfg.seed}: {cfg.prompt}"})


def _edit(models: FluxModels, cfg: EditConfig, job: Job) -> Result:
    """demo_4's run of `cfg` (the library's edit_generated / edit_real), pictures named as demo_4 names them."""
    request = cfg.request()
    if cfg.real:
        image = RealImage(pil_to_tensor(cfg.input_image), cfg.source_guidance, cfg.nudge)
        result = edit_real(models, request, image, callback=job.step)
    else:
        result = edit_generated(models, request, cfg.seed, *cfg.image_size, callback=job.step)
    names = [edit_file(i, p) for i, p in enumerate(cfg.edits)]
    refs = reference_files(cfg)
    pictures = ([cfg.input_image] if cfg.real else []) + [tensor_to_pil(result.reference)]
    pictures += [tensor_to_pil(e) for e in result.edits]
    kind = ["input", "reconstruction"] if cfg.real else ["reference"]
    captions = [f"{k}: {cfg.source_prompt}" if k != "input" else "input (fitted)" for k in kind]
    captions += [f"edit {i}: {e}" for i, e in enumerate(cfg.edits)]
    return Result(cfg, dict(zip(refs + names, pictures)), dict(zip(refs + names, captions)))


def edit_steps(cfg: EditConfig) -> int:
    """Sampler steps of one edit run: every chunk of edits denoises all steps, a real image is inverted first."""
    return cfg.num_steps * (len(edit_chunks(len(cfg.edits), cfg.batch_size)) + cfg.real)


def run_edit(
    models: FluxModels, jobs: Jobs, owner: str, cfg: EditConfig, plain: EditConfig | None, report: Report
) -> Result:
    """The edit, and with `plain` (the same config with no injection layers) the same edit without injection."""
    total = edit_steps(cfg) + (edit_steps(plain) if plain is not None else 0)
    with jobs.run(owner, total, report) as job:
        n = len(cfg.edits)
        job.stage(f"{'inversion, ' * cfg.real}reference and {n} edit{'s' * (n > 1)}, injection in {cfg.vital_layers}")
        result = _edit(models, cfg, job)
        if plain is not None:
            job.stage(f"reference and {n} edit{'s' * (n > 1)} without injection")
            result.plain = _edit(models, plain, job)
    return result


def run_bypass(models: FluxModels, jobs: Jobs, owner: str, cfg: TrajectoryConfig, report: Report) -> Result:
    """The prompt's reference and the same noise with `cfg.skip_layers` bypassed at every step (demo_2's skip)."""
    with jobs.run(owner, 2 * cfg.num_steps, report) as job:
        pictures = []
        bypassed = (f"image 2 of 2, layers {cfg.skip_layers} bypassed", [frozenset(cfg.skip_layers)])
        for what, skip in (("image 1 of 2, the reference", None), bypassed):
            job.stage(what)
            pictures.append(
                models.generate(
                    [cfg.prompt],
                    [cfg.seed],
                    *cfg.image_size,
                    cfg.num_steps,
                    cfg.guidance_value,
                    skip,
                    callback=job.step,
                )[0]
            )
    depth = model_spec(cfg.model).params.depth
    names = ", ".join(layer_name(i, depth) for i in cfg.skip_layers) or "nothing"
    return Result(
        cfg,
        {"reference.png": tensor_to_pil(pictures[0]), "bypass.png": tensor_to_pil(pictures[1])},
        {"reference.png": "reference", "bypass.png": f"bypassed: {names}"},
    )


# ----------------------------------------------------------------------------------------------- saving


def demo_of(cfg: Any) -> str:
    """The demo that reproduces `cfg`."""
    return {Text2ImgConfig: "demo_0_test", EditConfig: "demo_4_edit", TrajectoryConfig: "demo_1_layer"}[type(cfg)]


def config_text(cfg: Any, output_dir: str | Path) -> str:
    """The config JSON that makes the same pictures with the demo (`python <demo>.py this.json`) into output_dir."""
    data = json.loads(config_json(cfg, with_help=False)) | {"output_dir": str(output_dir)}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def save(result: Result, folder: str | Path) -> list[Path]:
    """Write `result` into `folder` in its demo's format: the PNGs with the demo's metadata, the config that makes
    them (<demo>.json, output_dir = this folder: the demo counts them as done) and, for an edit, what demo_4 adds
    (grid.png, results.json, written by demo_4 itself from these PNGs). Every file is written atomically; a folder
    that already holds files is refused, so two results never mix."""
    out = Path(folder).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds files: choose another folder")
    cfg = result.config
    written = []
    if isinstance(cfg, EditConfig):
        written += _save_edit(result, out)
    else:
        for name, image in result.images.items():
            save_png(out / name, image, _metadata(cfg, name))
            written.append(out / name)
    path = out / f"{demo_of(cfg)}.json"
    atomic_write_text(path, config_text(_config_in(cfg, out), out))
    if result.plain is not None:
        written += save(result.plain, out / "without_injection")
    return written + [path]


def _config_in(cfg: Any, out: Path) -> Any:
    """`cfg` as saved into `out`: a real image points at its copy there, so the config outlives the upload."""
    if isinstance(cfg, EditConfig) and cfg.real:
        source = out / f"source{Path(cfg.image).suffix.lower() or '.png'}"
        if not source.exists():
            shutil.copyfile(cfg.image, source)
        return demo_config(EditConfig, json.loads(config_json(cfg, with_help=False)) | {"image": str(source)})
    return cfg


def _metadata(cfg: Any, name: str) -> dict:
    """The record demo_0 (an image) or demo_1 (a sample's final.png: the reference bypasses nothing) writes."""
    own = {"prompt": cfg.prompt, "seed": cfg.seed}
    if isinstance(cfg, Text2ImgConfig):
        return settings_of(cfg) | own
    return settings_of(cfg) | {"skip_layers": sorted(cfg.skip_layers) if name == "bypass.png" else []} | own


def _dict(cfg: Any) -> dict:
    return json.loads(config_json(cfg, with_help=False))


def _save_edit(result: Result, out: Path) -> list[Path]:
    import demo_4_edit  # the demo completes its folder (grid.png, results.json) from the PNGs: nothing recomputed

    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(EditConfig, _dict(_config_in(result.config, out)) | {"output_dir": str(out)})
    prompts = {n: cfg.source_prompt for n in reference_files(cfg)} | {
        edit_file(i, p): p for i, p in enumerate(cfg.edits)
    }
    settings = edit_settings(cfg)
    for name, image in result.images.items():  # demo_4's record, and what its input.png adds
        extra = {"image": cfg.image, "size": cfg.size or 0} if name == "input.png" else {}
        save_png(out / name, image, settings | {"prompt": prompts[name]} | extra)
    demo_4_edit.main(cfg)
    return [out / n for n in result.images] + [out / "grid.png", out / "results.json"]


def fresh_folder(app: AppConfig, kind: str) -> Path:
    """A new folder under the app's output folder for one saved result: <output_dir>/<kind>_<time>[_n]."""
    root = Path(app.output_dir).expanduser()
    stem = f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = root / stem, 1
    while path.exists():
        n += 1
        path = root / f"{stem}_{n}"
    return path


# ----------------------------------------------------------------------------------------------- demo_3 folders


@dataclass
class Vitality:
    """What demo_3_dino.py wrote into a folder: its plot, contact sheet and vital layers."""

    folder: Path
    layers: list[int]
    summary: str
    plot: Path | None
    contact_sheet: Path | None


def read_vitality(folder: str | Path, model: str) -> Vitality:
    """A demo_3 output folder, its vital layers checked against `model` as demo_4 checks them."""
    from .edit import read_vital_layers

    p = Path(folder).expanduser()
    file = p / "vital_layers.json"
    if not file.is_file():
        raise UserError(
            f"{p} holds no vital_layers.json: give the output_dir of a demo_3_dino.py run (for flux-mini: "
            f"python demo_3_dino.py configs/mini/demo_3_dino.json writes outputs/mini/demo_3_dino)"
        )
    spec = model_spec(model).params
    layers = read_vital_layers(file, spec.depth, spec.depth_single_blocks)
    data = json.loads(file.read_text(encoding="utf-8-sig"))
    made_for = data.get("model")
    if made_for not in (None, model):
        raise UserError(f"{file} was made for {made_for}, but this app runs {model}: load that model's demo_3 folder")
    names = ", ".join(layer_name(i, spec.depth) for i in layers) or "none"
    summary = f"vital layers {layers} ({names}) of {made_for or 'the model'}, from {file}"
    return Vitality(
        p,
        layers,
        summary,
        *(p / n if (p / n).is_file() else None for n in ("vitality.png", "contact_sheet.png")),
    )


def default_vitality_folder(app: AppConfig) -> Path:
    """Where demo_3 writes for this app's folders: demo_3_dino beside the app's output folder."""
    return Path(app.output_dir).expanduser().parent / "demo_3_dino"
