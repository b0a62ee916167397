"""The browser app (demo_gr.py), driven as a user drives it: the running app on flux-tiny through gradio_client, and
once in a real headless Chromium. What the app shows and saves is pinned against the demos run on the saved configs."""

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -r requirements-app.txt")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

import demo_0_test  # noqa: E402
import demo_1_layer  # noqa: E402
import demo_4_edit  # noqa: E402
import demo_gr  # noqa: E402
from flux.errors import UserError  # noqa: E402
from stableflow import app as work  # noqa: E402
from stableflow.config import ConfigError, load_config  # noqa: E402
from stableflow.edit import EditConfig, fit_image  # noqa: E402
from stableflow.io import load_image  # noqa: E402
from stableflow.text2img import Text2ImgConfig  # noqa: E402
from stableflow.trajectory import TrajectoryConfig  # noqa: E402

RING = Path(__file__).resolve().parents[1] / "configs" / "mini" / "heldout_blue_ring.png"
# The edit tab's inputs in page order, on flux-tiny at a tiny size.
EDIT = {
    "upload": None,
    "source": "a red fox in the snow",
    "edits": "a white fox in the snow\na red fox on the grass",
    "seed": 1,
    "width": 48,
    "height": 32,
    "size": 32,
    "steps": 3,
    "guidance": None,
    "nudge": 1.15,
    "source_guidance": 1.0,
    "layers": "0, 1",
    "inject": "",
    "plain": False,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on flux-tiny, serving on a free local port; Save writes under a temporary folder."""
    out = tmp_path_factory.mktemp("app")
    args = argparse.Namespace(
        name="flux-tiny", device="cpu", offload=False, output_dir=str(out), host="127.0.0.1", port=None, share=False
    )
    demo, url, models, jobs = demo_gr.serve(args, block=False)
    yield argparse.Namespace(url=url, models=models, jobs=jobs, out=out)
    demo.close()


@pytest.fixture
def client(served):
    return Client(served.url, verbose=False)


def edit(client: Client, **changes):
    return client.predict(*(EDIT | changes).values(), api_name="/edit")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def record(path) -> dict:
    """A PNG's text chunks: the settings the demos record in it."""
    with Image.open(path) as im:
        return dict(im.text)


def saved(client: Client, kind: str) -> Path:
    """Save the session's last result; the folder it went to (the config offered for download lies in it)."""
    message, config = client.predict(api_name=f"/save_{kind}")
    folder = Path(message.split("`")[1])
    assert (folder / Path(config).name).is_file() and json.loads(Path(config).read_text())["output_dir"] == str(folder)
    return folder


def test_generate_is_demo_0s_picture_and_saves_in_its_format(client, served, tmp_path, capsys):
    shown, caption, *_ = client.predict("a red fox", 3, 48, 32, 3, None, api_name="/generate")
    assert "seed 3: a red fox" in caption
    folder = saved(client, "generate")
    cfg = load_config(Text2ImgConfig, folder / "demo_0_test.json")
    # The demo on the saved config finds the picture done (same settings recorded) and writes nothing new ...
    demo_0_test.main(cfg, served.models)
    assert "wrote 0 images" in capsys.readouterr().out
    # ... and the demo run afresh draws the same pixels the page showed and the folder holds.
    cfg.output_dir = str(tmp_path)
    (fresh,) = demo_0_test.main(cfg, served.models)
    assert np.array_equal(pixels(fresh), pixels(folder / fresh.name))
    assert np.array_equal(pixels(fresh), pixels(shown))
    assert record(folder / fresh.name) == record(fresh)  # the demo's record, key for key


def test_edit_generated_with_and_without_injection(client, served, tmp_path, capsys):
    injected, plain, note, *_ = edit(client, plain=True)
    assert [t["caption"] for t in injected] == [
        "reference: a red fox in the snow",
        "edit 0: a white fox in the snow",
        "edit 1: a red fox on the grass",
    ]
    assert "injection in layers [0, 1]" in note and len(plain["value"]) == 3
    # Injection changes the edits, never the reference.
    assert np.array_equal(pixels(injected[0]["image"]), pixels(plain["value"][0]["image"]))
    assert not np.array_equal(pixels(injected[1]["image"]), pixels(plain["value"][1]["image"]))
    folder = saved(client, "edit")
    for sub, layers in ((folder, [0, 1]), (folder / "without_injection", [])):
        cfg = load_config(EditConfig, sub / "demo_4_edit.json")
        assert cfg.vital_layers == layers
        assert demo_4_edit.main(cfg)["already_done"] == 2  # the saved PNGs record demo_4's settings
        cfg.output_dir = str(tmp_path / sub.name)
        demo_4_edit.main(cfg, served.models)
        for name in ("reference.png", "edit_00_a-white-fox-in-the-snow.png", "edit_01_a-red-fox-on-the-grass.png"):
            assert np.array_equal(pixels(sub / name), pixels(Path(cfg.output_dir) / name)), name
            assert record(sub / name) == record(Path(cfg.output_dir) / name), name
    shown = [pixels(t["image"]) for t in injected]
    assert all(
        np.array_equal(a, pixels(folder / n))
        for a, n in zip(shown, ["reference.png", "edit_00_a-white-fox-in-the-snow.png"])
    )


def test_edit_an_uploaded_image(client, served, tmp_path):
    tiles, _, note, *_ = edit(client, upload=handle_file(str(RING)), edits="a green ring")
    assert [t["caption"].split(":")[0] for t in tiles] == ["input (fitted)", "reconstruction", "edit 0"]
    # The input is fitted by the demo's rule: shorter side `size`, both sides cut to multiples of 16.
    assert np.array_equal(pixels(tiles[0]["image"]), np.asarray(fit_image(load_image(RING), 32)))
    assert "at 32x32" in note
    folder = saved(client, "edit")
    cfg = load_config(EditConfig, folder / "demo_4_edit.json")
    assert Path(cfg.image).parent == folder  # the config points at its copy of the upload, not the page's cache
    cfg.output_dir = str(tmp_path)
    demo_4_edit.main(cfg, served.models)
    for name in ("input.png", "reconstruction.png", "edit_00_a-green-ring.png"):
        assert np.array_equal(pixels(folder / name), pixels(tmp_path / name)), name
        assert record(folder / name) == record(tmp_path / name), name


def test_bypass_a_layer(client, served, tmp_path):
    (ref, bypassed), status, *_ = client.predict("a red fox", 2, 48, 32, 3, None, [1], api_name="/bypass")
    assert bypassed["caption"] == "bypassed: double_blocks.1"
    assert not np.array_equal(pixels(ref["image"]), pixels(bypassed["image"]))
    # The reference is demo_0's picture of the same prompt and seed; the bypass is demo_1's final image.
    shown, *_ = client.predict("a red fox", 2, 48, 32, 3, None, api_name="/generate")
    assert np.array_equal(pixels(ref["image"]), pixels(shown))
    cfg = load_config(TrajectoryConfig, saved(client, "layers") / "demo_1_layer.json")
    assert cfg.skip_layers == [1]
    cfg.output_dir = str(tmp_path)
    (sample,) = demo_1_layer.main(cfg, served.models)
    assert np.array_equal(pixels(sample / "final.png"), pixels(bypassed["image"]))


def test_bad_input_gets_the_demos_message_in_the_page(client, served, tmp_path):
    before = sorted(served.out.rglob("*"))
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    with pytest.raises(AppError) as e:
        edit(client, upload=handle_file(str(bad)))
    with pytest.raises(ConfigError) as demo:  # demo_4's own message for the same file
        load_config(EditConfig, None, [f"image={bad}"])
    upload = re.match(r"cannot read image (\S+) \(", str(e.value))[1]  # where the page put the upload
    assert [str(e.value).replace(upload, str(bad))] == [p for p in demo.value.problems if "image" in p]
    with pytest.raises(AppError, match=r"'width' must be a multiple of 16, got 40 \(nearest: 32 or 48\)"):
        client.predict("a red fox", 0, 40, 32, 3, None, api_name="/generate")
    with pytest.raises(AppError, match=r"layer 9 out of range: this model has layers 0\.\.5"):
        edit(client, layers="0, 9")
    with pytest.raises(AppError, match="injection layers: 'x' is not a whole number"):
        edit(client, layers="0, x")
    with pytest.raises(AppError, match="nothing to save yet"):
        Client(served.url, verbose=False).predict(api_name="/save_edit")
    assert sorted(served.out.rglob("*")) == before  # nothing written


def test_one_job_at_a_time_the_second_waits_with_its_place(served):
    first, second = Client(served.url, verbose=False), Client(served.url, verbose=False)
    served.jobs._lock.acquire()  # hold the model: the first job starts and waits here, the second must queue
    try:
        a = first.submit("a red fox", 0, 48, 32, 3, None, api_name="/generate")
        deadline = time.monotonic() + 60
        while a.status().code != Status.PROCESSING and time.monotonic() < deadline:
            time.sleep(0.05)
        b = second.submit("a lighthouse", 1, 48, 32, 3, None, api_name="/generate")
        seen = []
        while time.monotonic() < deadline and len(seen) < 5:
            s = b.status()
            if s.code == Status.IN_QUEUE and s.rank is not None:
                seen.append((s.rank, s.queue_size))
            time.sleep(0.05)
        assert seen and seen[-1] == (0, 1)  # first in line, one job waiting: what the page shows as "1/1"
        assert a.status().code == Status.PROCESSING
    finally:
        served.jobs._lock.release()
    a.result(timeout=60), b.result(timeout=60)
    (job_a, start_a, end_a), (job_b, start_b, end_b) = list(served.jobs.log)[-2:]
    assert job_a.owner != job_b.owner and end_a <= start_b  # one after the other, never together


def test_cancel_stops_the_running_job_and_writes_nothing(served):
    c = Client(served.url, verbose=False)
    before = sorted(served.out.rglob("*"))
    job = c.submit("a red fox", 0, 16, 16, 1000, None, api_name="/generate")
    deadline = time.monotonic() + 60
    progress = []  # what the page shows while it runs: the step count and the images
    while not progress and time.monotonic() < deadline:
        progress = job.status().progress_data or []
        time.sleep(0.02)
    assert progress[0].length == 1000 and progress[0].unit == "steps"
    assert progress[0].desc == f"1 image: step {progress[0].index} of 1000"
    assert "cancelling" in c.predict(api_name="/cancel")
    while served.jobs.current is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped, *_ = served.jobs.log[-1]
    assert stopped.done < stopped.total == 1000 and stopped.cancel.is_set()  # stopped between two steps
    with pytest.raises(Exception):
        job.result(timeout=30)
    assert sorted(served.out.rglob("*")) == before
    assert "none of your jobs is running" in c.predict(api_name="/cancel")


def test_starting_layers_are_demo_3s_for_this_model_else_the_releases(tmp_path):
    app = work.AppConfig("flux-tiny", "cpu", output_dir=str(tmp_path / "app"))
    assert work.default_layers(app) == ([0, 1, 2, 3, 5], work.default_layers(app)[1])
    assert "default" in work.default_layers(app)[1]
    (tmp_path / "demo_3_dino").mkdir()
    file = tmp_path / "demo_3_dino" / "vital_layers.json"
    file.write_text(json.dumps({"model": "flux-tiny", "num_double": 2, "vital_layers": [1, 4]}))
    assert work.default_layers(app) == ([1, 4], f"file {file}")
    vitality = work.read_vitality(tmp_path / "demo_3_dino", "flux-tiny")
    assert vitality.layers == [1, 4] and "double_blocks.1" in vitality.summary
    file.write_text(json.dumps({"model": "flux-mini", "num_double": 4, "vital_layers": [1, 4]}))
    assert work.default_layers(app)[0] == [0, 1, 2, 3, 5]  # made for another model: not taken
    with pytest.raises(UserError, match="made for a model with 4 double blocks"):
        work.read_vitality(tmp_path / "demo_3_dino", "flux-tiny")


def test_flux_minis_examples_are_captions_of_its_world():
    from mini.world import caption, parse_caption

    for source, edits, _ in work.EDIT_EXAMPLES["flux-mini"]:
        for text in (source, *edits):
            assert caption(parse_caption(text)) == text  # the world's own wording: flux-mini learned only that


@pytest.mark.slow
def test_layers_tab_shows_a_demo_3_folder_and_hands_its_layers_to_the_edit_tab(client, run_script, tmp_path):
    sweep, scored = tmp_path / "demo_2_skip", tmp_path / "demo_3_dino"
    assert run_script("demo_2_skip.py", "configs/tiny/demo_2_skip.json", f"output_dir={sweep}").returncode == 0
    r = run_script("demo_3_dino.py", "configs/tiny/demo_3_dino.json", f"sweep_dir={sweep}", f"output_dir={scored}")
    assert r.returncode == 0, r.stderr
    vital = json.loads((scored / "vital_layers.json").read_text())["vital_layers"]
    summary, plot, sheet = client.predict(str(scored), api_name="/vitality")
    assert f"vital layers {vital}" in summary
    assert np.array_equal(pixels(plot), pixels(scored / "vitality.png"))
    assert np.array_equal(pixels(sheet), pixels(scored / "contact_sheet.png"))
    assert work.parse_numbers(client.predict(api_name="/use_vitality")["value"], "layers") == vital
    with pytest.raises(AppError, match="holds no vital_layers.json"):
        client.predict(str(sweep), api_name="/vitality")


def test_without_gradio_one_line_says_how_to_install(run_script, tmp_path):
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("raise ImportError('No module named gradio')\n")
    r = run_script("demo_gr.py", "--name", "flux-tiny", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.strip() == demo_gr.INSTALL and r.stdout == ""


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-app.txt)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "Chromium and its driver are not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_a_real_browser_uploads_an_image_and_sees_the_edit(served):
    runs = len(served.jobs.log)
    shown = demo_gr.browser_edit(served.url, image=str(RING), timeout=120)
    edits = load_config(EditConfig, RING.parents[1] / "tiny" / "demo_4_edit.json").edits  # the page's starting ones
    assert shown == 2 + len(edits)  # input, reconstruction and every edit
    job, *_ = served.jobs.log[-1]
    assert len(served.jobs.log) == runs + 1 and job.done == job.total
