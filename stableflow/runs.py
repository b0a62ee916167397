"""Run records: what decides a demo's outputs, written into each of them and checked on every re-run.

A record is a flat dict of JSON values: the run's settings (`settings`, the one place they are derived from a
config: model, weights, dtype, size, steps, guidance as the model uses it, fp8 when on) plus what is particular to
the demo or to one output (prompt, seed, layers, ...). `Run` writes it into every PNG (one text chunk per key: strings
as they are, other values as JSON) and into the demo's JSON record (run.json, results.json, manifest.json), and on a
re-run reads every output already there:

- an output whose files all decode and whose record matches is done (PNGs are checked whole: every chunk's CRC up to
  the end, so a file cut short or damaged after it was written is caught without decoding its pixels);
- an output with a file that does not decode is made again and counted as repaired;
- an output recorded with other settings stops the run before anything is written: a UserError names each change.

PNGs are encoded and written on a writer thread (atomically: temp file + rename) while the next ones are computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from PIL import Image

from flux.errors import UserError
from flux.util import ASSETS, configs

from .io import atomic_write_json, examples, save_png

if TYPE_CHECKING:
    from .config import BaseConfig
    from .io import ImageLike

# ---------------------------------------------------------------------------------------------------- settings


def guidance_used(model: str, guidance: float) -> float | None:
    """The guidance as the model uses it: None (JSON null) for a model whose output does not depend on it (no
    guidance embedding and no classifier-free guidance: schnell, the shipped flux-mini)."""
    return float(guidance) if configs[model].uses_guidance else None


def fingerprint(path: str | os.PathLike, sample: int = 1 << 16, chunks: int = 16) -> str:
    """A cheap identity of a weights file or folder: its safetensors files' sizes, their first MiB (the header) and
    `chunks` samples of `sample` bytes spread over each, hashed. Equal files agree wherever they lie; a finetune of
    the same architecture (same header, same size) differs in the sampled weights."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.safetensors") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p).as_posix() if f != p else ''}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(chunks):
                fh.seek(size * k // chunks)
                h.update(fh.read(sample))
    return f"{len(files)} file(s), {sum(f.stat().st_size for f in files)} bytes, sha256 sampled {h.hexdigest()[:16]}"


def _builtin(relative: str) -> str:
    """A shipped asset (flux/assets/...) by the SHA-256 its manifest records."""
    folder, _, name = relative.partition("/")
    manifest = json.loads((ASSETS / folder / "manifest.json").read_text())
    return f"built-in {relative} sha256 {manifest['sha256'][name][:16]}"


def weights(cfg: BaseConfig) -> dict[str, str]:
    """Which weights of each network the config's run uses, as load_models resolves them: a given path (by its
    fingerprint, so that moving a file changes nothing and another file of the same name is noticed), a variable
    naming a checkpoint, a shipped asset, the Hub file, or random weights from a seed."""
    spec = configs[cfg.model]
    env = next((os.environ[v] for v in spec.ckpt_env if os.environ.get(v)), None)
    ae_env = next((os.environ[v] for v in ("FLUX_AE", "AE") if os.environ.get(v)), None)

    def network(path: str | None, local: str | None, env_path: str | None, repo_file: str | None) -> str:
        if path:
            return fingerprint(path)
        if local:
            return _builtin(local)
        if env_path:
            return fingerprint(env_path)
        if spec.repo_id and repo_file:
            return f"hub {spec.repo_id} {repo_file}"
        return f"random (seed {spec.seed})"

    def encoder(path: str | None, version: str, files: str) -> str:
        if path:
            return fingerprint(path)
        if version == "tiny":
            return "random (tiny)"
        if Path(version).is_dir() and Path(version).is_relative_to(ASSETS):
            return _builtin(f"{Path(version).relative_to(ASSETS).as_posix()}/{files}")
        return f"hub {version}"

    return {
        "flow": network(cfg.flow_path, spec.local_flow, env, spec.repo_flow),
        "ae": network(cfg.ae_path, spec.local_ae, ae_env, spec.repo_ae),
        "t5": encoder(cfg.t5_path, spec.t5_version, "model.safetensors"),
        "clip": encoder(cfg.clip_path, spec.clip_version, "model.safetensors"),
    }


def settings(
    model: str,
    weights: Mapping[str, str] | None,
    dtype: str,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    fp8: bool = False,
) -> dict[str, Any]:
    """What decides every output of a run, recorded the same way by every demo. Speed options change results
    only by rounding and are left out, except fp8 (approximate weights)."""
    out = {"model": model, "weights": dict(weights) if weights is not None else None, "dtype": dtype, "fp8": fp8}
    return out | {"width": width, "height": height, "steps": steps, "guidance": guidance_used(model, guidance)}


def settings_of(cfg: Any) -> dict[str, Any]:
    """`settings` of a demo's config (a SamplingConfig: size, steps and guidance resolved by its defaults rule)."""
    width, height = cfg.image_size
    return settings(cfg.model, weights(cfg), cfg.dtype, width, height, cfg.num_steps, cfg.guidance_value, cfg.fp8)


# ------------------------------------------------------------------------------------------------ reading back


def as_text(value: Any) -> str:
    """A record's value as a PNG text chunk holds it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _decoded(value: Any) -> Any:
    """A nested record as a PNG's text chunk holds it (JSON), as data."""
    if isinstance(value, str) and value.startswith("{"):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def changes(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """How `recorded` differs from `expected`, one "key old -> new" per key of `expected` (a nested record names
    its inner key: "weights.flow ..."). Values are compared as text, so a PNG's chunks and a JSON file compare alike."""
    out = []
    for key, want in expected.items():
        have = _decoded(recorded.get(key)) if isinstance(want, Mapping) else recorded.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            out += [f"{key}.{c}" for c in changes(have, want)]
        elif key not in recorded:
            out.append(f"{key} (not recorded) -> {as_text(want)}")
        elif as_text(have) != as_text(want):
            out.append(f"{key} {as_text(have)} -> {as_text(want)}")
    return out


def decodes(path: Path) -> bool:
    """Whether the whole file decodes: a PNG's every chunk to IEND with its CRC (cheap: no pixels decoded), any
    other image (a GIF) by loading every frame."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    im.load()
        return True
    except (OSError, SyntaxError, ValueError, EOFError):
        return False


def png_record(path: Path) -> dict[str, str] | None:
    """The text chunks of a PNG that decodes whole, else None (missing, cut short or damaged)."""
    if not path.is_file() or not decodes(path):
        return None
    with Image.open(path) as im:
        return dict(im.info.items()) | dict(getattr(im, "text", {}))


def refuse(folder: Path, changed: Mapping[str, Sequence[str]]) -> None:
    """UserError naming what changed (a description -> the files it concerns), if anything did."""
    if changed:
        shown = "; ".join(f"({diff}): {examples(list(names), 3)}" for diff, names in changed.items())
        raise UserError(
            f"{folder} holds outputs made with other settings {shown}. Choose another output_dir, or delete "
            f"those files to make them again with these settings"
        )


# ----------------------------------------------------------------------------------------------------- writing


class PngWriter:
    """Encodes and writes PNGs (atomically, stableflow.io.save_png) on background threads while the caller
    computes the next ones. `wait()` returns what was written and raises the first error of a write."""

    def __init__(self, threads: int = 2, on_written: Callable[[Path], None] | None = None):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="png")
        self._pending: list[Future] = []
        self.on_written, self.written, self._limit = on_written, [], 4 * threads

    def submit(self, path: Path, image: ImageLike, meta: Mapping[str, Any] | None = None) -> None:
        if hasattr(image, "detach"):
            image = image.detach().cpu()  # the device's tensor is free for the next batch
        if len(self._pending) >= self._limit:  # bounded: images waiting to be written hold host memory
            self.written.append(self._pending.pop(0).result())
        self._pending.append(self._pool.submit(self._write, Path(path), image, dict(meta or {})))

    def _write(self, path: Path, image: ImageLike, meta: dict) -> Path:
        save_png(path, image, meta)
        if self.on_written is not None:
            self.on_written(path)
        return path

    def wait(self) -> list[Path]:
        pending, self._pending = self._pending, []
        self.written += [f.result() for f in pending]
        return self.written

    def close(self, ok: bool = True) -> None:
        try:
            if ok:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close(exc[0] is None)


# ------------------------------------------------------------------------------------------------------ the run


@dataclass
class Output:
    """One output of a run: `name` (relative to the run's folder) is the PNG that carries `record`; `files` are
    the output's other files, which must decode too for it to count as done."""

    name: str
    record: dict[str, Any]
    files: tuple[str, ...] = ()


class Run:
    """The outputs of one run in `folder` as the folder stands: which are done, which to make (`todo`), how many of
    those were damaged (`repaired`); then the writing of the new ones, progress and timing.

    Every existing output is read when the Run is made, so a folder made with other settings is refused before
    anything is loaded or written.
    """

    def __init__(self, folder: str | os.PathLike, outputs: Sequence[Output], settings: Mapping[str, Any]):
        self.folder, self.outputs, self.settings = Path(folder).expanduser(), list(outputs), dict(settings)
        self.done: list[Output] = []
        self.todo: list[Output] = []
        self.repaired = 0
        self.seconds = 0.0
        self.writer: PngWriter | None = None
        self._records = {o.name: o.record for o in self.outputs}
        changed: dict[str, list[str]] = {}
        for out in self.outputs:
            files = [self.folder / n for n in (out.name, *out.files)]
            present = [f for f in files if f.is_file()]
            record = png_record(files[0])
            if record is not None and (diff := changes(record, out.record)):
                changed.setdefault("; ".join(diff[:4]), []).append(out.name)
            elif (files[0] in present and record is None) or not all(decodes(f) for f in present if f != files[0]):
                self.todo.append(out)  # there, but cut short or damaged after it was written
                self.repaired += 1
            elif len(present) < len(files):
                self.todo.append(out)  # missing, or killed before its last file: unfinished, not damaged
            else:
                self.done.append(out)
        refuse(self.folder, changed)

    @property
    def todo_names(self) -> list[str]:
        return [o.name for o in self.todo]

    def record_of(self, name: str) -> dict[str, Any]:
        return self._records[name]

    @contextlib.contextmanager
    def working(self, total: int, desc: str, unit: str = "step", threads: int = 2) -> Iterator[Any]:
        """The progress bar over `total` units of work, with the PNG writer open (`save`) and the clock running;
        on leaving, every PNG has been written (a write's error is raised) and `seconds` is the time taken."""
        from tqdm import tqdm

        start = time.perf_counter()
        bar = tqdm(total=total, desc=desc, unit=unit, smoothing=0)
        self.writer = PngWriter(threads)
        ok = False
        try:
            yield bar
            ok = True
        finally:
            self.writer.close(ok)
            bar.close()
            self.seconds = time.perf_counter() - start

    def save(self, name: str, image: ImageLike, extra: Mapping[str, Any] | None = None, record: str | None = None):
        """Write `name` on the writer thread with the record of output `record` (default: `name`'s own) and `extra`
        (what only this file records, e.g. a frame's step)."""
        meta = self.record_of(record or name) | dict(extra or {})
        if self.writer is None:  # outside `working`: write now
            save_png(self.folder / name, image, meta)
        else:
            self.writer.submit(self.folder / name, image, meta)

    def repairs(self, unit: str = "damaged file") -> str:
        """ ", N damaged files remade" for the summary line, or nothing."""
        return f", {self.repaired} {unit}{'s' * (self.repaired != 1)} remade" if self.repaired else ""

    def write_json(self, name: str, body: Mapping[str, Any]) -> None:
        """The run's JSON record (run.json, results.json): `body` with the run's settings and this run's counts."""
        atomic_write_json(self.folder / name, {"settings": self.settings, **body, "repaired": self.repaired})
