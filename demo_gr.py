"""Stable Flow in the browser: python demo_gr.py [--name flux-mini] [--device cpu] [--port 7860]

Three tabs on one model loaded once: Generate (demo_0), Edit (demo_4: a generated reference or an uploaded picture,
with and without injection), Layers (demo_2's bypass of chosen layers; demo_3's plot and contact sheet). One job runs
on the model at a time; the others wait with their place shown. Every result can be saved in its demo's format, with
the config that makes it again. The work is stableflow.app's; this file is the page.
"""

import argparse
import sys
from functools import wraps
from pathlib import Path

INSTALL = "demo_gr.py needs Gradio, an optional extra: pip install -r requirements-app.txt (or pip install -e '.[app]')"


def page(app, models, jobs):
    """The app's page: a gradio Blocks on `models` (a FluxModels) and `jobs` (stableflow.app.Jobs)."""
    import gradio as gr

    from flux.errors import UserError
    from stableflow import app as work
    from stableflow.edit import EditConfig
    from stableflow.io import load_image
    from stableflow.text2img import Text2ImgConfig
    from stableflow.trajectory import TrajectoryConfig

    def shown(fn):
        """A bad request's message (the demos' own) in the page, instead of a traceback."""

        @wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None

        return run

    def reporter(progress: gr.Progress):
        return lambda done, total, what: progress((done, total), desc=f"{what}: step {done} of {total}", unit="steps")

    def owner(request: gr.Request | None) -> str:
        return request.session_hash if request is not None else "api"

    def none(x):  # an empty number box means "the demo's default"
        return None if x in (None, "") else x

    def saved(result: work.Result | None, kind: str):
        if result is None:
            raise UserError("nothing to save yet: run a job first")
        folder = work.fresh_folder(app, kind)
        files = work.save(result, folder)
        demo = work.demo_of(result.config)
        config = folder / f"{demo}.json"
        return (
            f"saved {len(files)} files to `{folder}`; the same pictures again: `python {demo}.py {config}`",
            str(config),
        )

    gen0 = app.shipped(Text2ImgConfig, "demo_0_test")
    edit0 = app.shipped(EditConfig, "demo_4_edit")
    real0 = app.shipped(EditConfig, "demo_4_edit_real")
    layers0, layers_from = work.default_layers(app)
    bypass0 = app.shipped(TrajectoryConfig, "demo_1_layer")
    model_events = {"concurrency_limit": 1, "concurrency_id": "model"}  # one job on the model; the others queue

    def picture_fields(cfg) -> list:
        """Prompt, seed, size, steps and guidance boxes, starting from a demo's config."""
        prompt = gr.Textbox(cfg.prompt if isinstance(cfg.prompt, str) else cfg.prompt[0], label="prompt", lines=2)
        (width, height), steps, guidance = cfg.image_size, cfg.num_steps, cfg.guidance_value
        with gr.Row():
            return [
                prompt,
                gr.Number(cfg.seeds()[0], label="seed", precision=0, minimum=0),
                gr.Number(width, label="width (multiple of 16)", precision=0),
                gr.Number(height, label="height (multiple of 16)", precision=0),
                gr.Number(steps, label="steps", precision=0),
                gr.Number(guidance, label="guidance"),
            ]

    def buttons(label: str, kind: str) -> tuple:
        """Run, Cancel and Save, in a row."""
        with gr.Row():
            return (
                gr.Button(label, variant="primary", elem_id=f"{kind}-run"),
                gr.Button("Cancel", elem_id=f"{kind}-cancel"),
                gr.Button("Save", elem_id=f"{kind}-save"),
            )

    with gr.Blocks(title=f"Stable Flow · {app.model}") as demo:
        gr.Markdown(
            f"## Stable Flow on {app.model}\nOne job runs on the model at a time; the others wait with their place "
            f"shown. Results stay in the page until saved (`{app.output_dir}`)."
        )
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    g_inputs = picture_fields(gen0)
                    g_run, g_cancel, g_save = buttons("Generate", "generate")
                with gr.Column():
                    g_image = gr.Image(
                        label="image", type="pil", format="png", interactive=False, elem_id="generate-image"
                    )
                    g_status = gr.Markdown()
                    g_file = gr.File(label="config (python demo_0_test.py config.json)", interactive=False)
            g_state = gr.State(None)

        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    e_upload = gr.File(
                        label="real image to edit (none: edit a generated reference)",
                        file_types=["image"],
                        type="filepath",
                        elem_id="edit-upload",
                    )
                    e_source = gr.Textbox(
                        edit0.source_prompt, label="source prompt (describes the reference)", elem_id="edit-source"
                    )
                    e_edits = gr.Textbox("\n".join(edit0.edits), label="edit prompts, one a line", lines=3)
                    with gr.Row():
                        e_seed = gr.Number(edit0.seed, label="seed (generated)", precision=0, minimum=0)
                        e_width = gr.Number(edit0.image_size[0], label="width (generated)", precision=0)
                        e_height = gr.Number(edit0.image_size[1], label="height (generated)", precision=0)
                        e_size = gr.Number(real0.size, label="shorter side (real; fitted to 16s)", precision=0)
                    with gr.Row():
                        e_steps = gr.Number(edit0.num_steps, label="steps", precision=0)
                        e_guidance = gr.Number(edit0.guidance_value, label="guidance")
                        e_nudge = gr.Number(real0.nudge, label="nudge (real)")
                        e_source_guidance = gr.Number(real0.source_guidance, label="source guidance (real)")
                    e_layers = gr.Textbox(
                        ", ".join(map(str, layers0)),
                        label="injection layers",
                        info=f"starting value: {layers_from}",
                        elem_id="edit-layers",
                    )
                    e_inject = gr.Textbox("", label="inject steps: start, end (empty: every step)")
                    e_plain = gr.Checkbox(
                        False, label="also run the same edits without injection", elem_id="edit-plain"
                    )
                    e_run, e_cancel, e_save = buttons("Edit", "edit")
                    if examples := work.EDIT_EXAMPLES.get(app.model):
                        gr.Examples(
                            [[source, "\n".join(edits), seed] for source, edits, seed in examples],
                            [e_source, e_edits, e_seed],
                            label=f"examples: click one to fill the prompts and seed ({app.model})",
                            elem_id="edit-examples",
                        )
                with gr.Column():
                    e_gallery = gr.Gallery(
                        label="with injection",
                        columns=4,
                        height="auto",
                        format="png",
                        object_fit="contain",
                        elem_id="edit-gallery",
                    )
                    e_gallery_plain = gr.Gallery(
                        label="without injection",
                        columns=4,
                        height="auto",
                        format="png",
                        object_fit="contain",
                        visible=False,
                    )
                    e_status = gr.Markdown(elem_id="edit-status")
                    e_file = gr.File(label="config (python demo_4_edit.py config.json)", interactive=False)
            e_state = gr.State(None)

        with gr.Tab("Layers", id="layers"):
            with gr.Row():
                with gr.Column():
                    b_inputs = picture_fields(bypass0)
                    b_layers = gr.CheckboxGroup(work.layer_choices(app.model), label="layers to bypass")
                    b_run, b_cancel, b_save = buttons("Bypass", "layers")
                with gr.Column():
                    b_gallery = gr.Gallery(
                        label="reference and bypassed", columns=2, height="auto", format="png", object_fit="contain"
                    )
                    b_status = gr.Markdown()
                    b_file = gr.File(label="config (python demo_1_layer.py config.json)", interactive=False)
            b_state = gr.State(None)
            gr.Markdown("### A demo_3 run: vitality of every layer")
            with gr.Row():
                v_folder = gr.Textbox(str(work.default_vitality_folder(app)), label="demo_3_dino.py output folder")
                v_load = gr.Button("Load")
                v_use = gr.Button("Use its vital layers for editing")
            v_summary = gr.Markdown()
            with gr.Row():
                v_plot = gr.Image(label="vitality.png", format="png", interactive=False)
                v_sheet = gr.Image(label="contact_sheet.png", format="png", interactive=False)
            v_layers = gr.State(None)

        # --------------------------------------------------------------------------------------- the handlers

        @shown
        def generate(prompt, seed, width, height, steps, guidance, request: gr.Request, progress=gr.Progress()):
            cfg = work.generate_config(app, work.PictureForm(prompt, seed, width, height, none(steps), none(guidance)))
            result = work.run_generate(models, jobs, owner(request), cfg, reporter(progress))
            ((image, caption),) = result.gallery()
            return image, f"{caption} ({'x'.join(map(str, cfg.image_size))})", result

        @shown
        def edit(upload, source, edits, seed, width, height, size, steps, guidance, nudge, source_guidance, layers,
                 inject, plain, request: gr.Request, progress=gr.Progress()):  # fmt: skip
            form = work.EditForm(
                source,
                (edits or "").splitlines(),
                seed,
                width,
                height,
                upload or None,
                none(size),
                none(steps),
                none(guidance),
                work.parse_numbers(layers, "injection layers"),
                work.parse_numbers(inject, "inject steps") or None,
                none(nudge),
                none(source_guidance),
            )
            cfg, source_of_layers = work.edit_config(app, form)
            without = work.edit_config(app, work.EditForm(**{**vars(form), "layers": []}))[0] if plain else None
            result = work.run_edit(models, jobs, owner(request), cfg, without, reporter(progress))
            w, h = cfg.image_size
            note = f"{len(cfg.edits)} edit(s) at {w}x{h}, {cfg.num_steps} steps, injection in layers {cfg.vital_layers}"
            note += f" ({source_of_layers})" if source_of_layers != "given" else ""
            return (
                result.gallery(),
                gr.Gallery(value=result.plain.gallery() if plain else None, visible=plain),
                note,
                result,
            )

        @shown
        def bypass(prompt, seed, width, height, steps, guidance, layers, request: gr.Request, progress=gr.Progress()):
            form = work.PictureForm(prompt, seed, width, height, none(steps), none(guidance))
            cfg = work.bypass_config(app, form, sorted(layers or []))
            result = work.run_bypass(models, jobs, owner(request), cfg, reporter(progress))
            return result.gallery(), f"{'x'.join(map(str, cfg.image_size))}, {cfg.num_steps} steps", result

        def mode(upload):  # an upload or its removal: the release's steps and guidance for that kind of edit
            cfg = real0 if upload else edit0
            return cfg.num_steps, cfg.guidance_value

        def cancel(request: gr.Request):
            if jobs.cancel(owner(request)):
                return "cancelling: the job stops at its next step and writes nothing"
            return "none of your jobs is running (a waiting one leaves the queue)"

        @shown
        def load_vitality(folder):
            v = work.read_vitality(folder, app.model)
            return v.summary, *(load_image(p) if p else None for p in (v.plot, v.contact_sheet)), v

        def use_vitality(v):
            if v is None:
                raise gr.Error("load a demo_3 folder first")
            return gr.Textbox(value=", ".join(map(str, v.layers)), info=f"from {v.folder}")

        g_event = g_run.click(generate, g_inputs, [g_image, g_status, g_state], api_name="generate", **model_events)
        e_inputs = [e_upload, e_source, e_edits, e_seed, e_width, e_height, e_size, e_steps, e_guidance, e_nudge]
        e_inputs += [e_source_guidance, e_layers, e_inject, e_plain]
        e_outputs = [e_gallery, e_gallery_plain, e_status, e_state]
        e_upload.change(mode, e_upload, [e_steps, e_guidance], queue=False)
        e_event = e_run.click(edit, e_inputs, e_outputs, api_name="edit", **model_events)
        b_event = b_run.click(
            bypass, b_inputs + [b_layers], [b_gallery, b_status, b_state], api_name="bypass", **model_events
        )
        events = [g_event, e_event, b_event]
        for button, status in ((g_cancel, g_status), (e_cancel, e_status), (b_cancel, b_status)):
            button.click(
                cancel, None, status, cancels=events, queue=False, api_name="cancel" if status is g_status else False
            )
        for button, state, status, file, kind in (
            (g_save, g_state, g_status, g_file, "generate"),
            (e_save, e_state, e_status, e_file, "edit"),
            (b_save, b_state, b_status, b_file, "layers"),
        ):
            button.click(shown(lambda r, kind=kind: saved(r, kind)), state, [status, file], api_name=f"save_{kind}")
        v_load.click(load_vitality, v_folder, [v_summary, v_plot, v_sheet, v_layers], api_name="vitality")
        v_use.click(use_vitality, v_layers, e_layers)
    return demo


def browser_edit(
    url: str,
    image: str | None = None,
    screenshot: str | None = None,
    plain: bool = False,
    example: int | None = None,
    timeout: float = 300,
) -> int:
    """Open the page in headless Chromium (the system's chromium and chromedriver, driven by selenium), upload
    `image` (None: edit a generated reference) or click the edit tab's `example`, run the edit with the page's
    values (`plain`: also without injection) and wait for the result; save a screenshot of the page if asked.
    Returns the number of pictures the result shows."""
    import shutil

    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        wait = WebDriverWait(driver, timeout)
        driver.get(url)
        tab = wait.until(
            lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Edit"]
        )
        tab[0].click()
        if image is not None:
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-upload input[type=file]"))[0].send_keys(
                str(Path(image).resolve())
            )
            wait.until(lambda d: Path(image).stem in d.find_element(By.ID, "edit-upload").text)  # uploaded
        if example is not None:
            rows = wait.until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-examples tbody tr, #edit-examples button")
            )
            source = driver.find_element(By.CSS_SELECTOR, "#edit-source textarea")
            before = source.get_attribute("value")
            rows[example].click()
            wait.until(lambda d: source.get_attribute("value") != before)  # the example's prompts are in the page
        if plain:
            driver.find_element(By.CSS_SELECTOR, "#edit-plain input[type=checkbox]").click()
        driver.find_element(By.ID, "edit-run").click()
        try:
            wait.until(lambda d: "edit(s) at" in d.find_element(By.ID, "edit-status").text)  # written when done
        except TimeoutException:
            driver.save_screenshot(str(Path(screenshot or "app_failure.png").with_suffix(".failed.png")))
            raise
        pictures = driver.find_elements(By.CSS_SELECTOR, "#edit-gallery img")
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1400, min(height + 200, 2400))
            driver.execute_script("window.scrollTo(0, 0)")
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return len(pictures)
    finally:
        driver.quit()


def serve(args: argparse.Namespace, block: bool = True):
    """Load the model once, build the page and start serving it; returns the page, its URL, the models and the
    job lock (the tests look at what ran when)."""
    from stableflow.app import AppConfig, Jobs

    app = AppConfig(args.name, args.device, args.offload, args.output_dir)
    print(f"loading {app.model} on {args.device} ({app.dtype}) ...", flush=True)
    models, jobs = app.load(), Jobs()
    demo = page(app, models, jobs)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        prevent_thread_lock=not block,
        allowed_paths=[str(Path(app.output_dir).expanduser().resolve().parent)],
        show_error=True,
    )
    return demo, url, models, jobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=None, help="model: flux-dev, flux-schnell, flux-krea-dev, flux-mini, "
                        "flux-tiny (default: flux-dev with a CUDA GPU, else flux-mini, which ships with the repository)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--offload", action="store_true", help="keep each network on the GPU only while it is used")
    parser.add_argument("--output-dir", default=None, help="where Save writes (default: outputs/<mini|tiny>/app)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--screenshot", metavar="PNG", help="run one edit in headless Chromium, save the page, exit")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(INSTALL, file=sys.stderr)
        raise SystemExit(2) from None

    from flux.errors import UserError
    from stableflow import app as work

    args.name = args.name or work.default_model()
    try:
        if args.screenshot:
            demo, url, _, _ = serve(args, block=False)
            example = 0 if work.EDIT_EXAMPLES.get(args.name) else None  # the first example, where the model has one
            browser_edit(url, screenshot=args.screenshot, plain=True, example=example)
            demo.close()
            print(f"wrote {args.screenshot}")
        else:
            serve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
