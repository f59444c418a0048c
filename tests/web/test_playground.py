"""The playground at ``/`` in a real headless Chromium against a real ``ccsr serve`` (tiny model, CPU).

One upscale drives the whole happy path (upload, sizes, progress, result, slider, zoom, downloads, code
snippet, screenshot); the error path checks that the API's own error text reaches the page.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait
from tests.conftest import FIXTURES

from ccsr.api.fal_schema import CCSRInput
from ccsr.params import UpscaleParams

pytestmark = pytest.mark.timeout(150)

ARTIFACTS = Path(__file__).resolve().parents[1] / "_artifacts"
INPUT = FIXTURES / "inputs" / "lq_48x40.png"


def open_page(browser, server):
    browser.get(f"{server.base}/")
    wait = WebDriverWait(browser, 20)
    wait.until(ec.presence_of_element_located((By.ID, "param-steps")))  # the form is built from /playground/models
    return wait


def set_number(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value)


def wait_download(folder: Path, suffix: str, timeout: float = 20) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = [p for p in folder.iterdir() if p.suffix == suffix]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} download in {folder}: {list(folder.iterdir())}")


def test_upscale_end_to_end(browser, server, downloads):
    wait = open_page(browser, server)
    browser.get_log("browser")  # start from an empty console
    # the form carries the server's defaults (the library's, not fal's 50 steps) and the fal schema's ranges
    model = httpx.get(f"{server.base}/playground/models", timeout=10).json()[0]
    spec = {p["name"]: p for p in model["parameters"]}
    assert spec["steps"]["default"] == UpscaleParams().steps
    steps = browser.find_element(By.ID, "param-steps")
    fal = CCSRInput.model_json_schema()["properties"]["steps"]
    assert (steps.get_attribute("value"), steps.get_attribute("min"), steps.get_attribute("max")) == (
        str(UpscaleParams().steps),
        str(fal["minimum"]),
        str(fal["maximum"]),
    )
    assert "reference CCSR" in browser.find_element(By.ID, "param-steps-hint").text  # says why
    assert Select(browser.find_element(By.ID, "param-color_fix_type")).first_selected_option.text == "adain"
    # tiling reads "automatic" (the server plans it) and is left out of the request
    for name in ("tile_diffusion", "tile_vae"):
        option = Select(browser.find_element(By.ID, f"param-{name}")).first_selected_option
        assert option.get_attribute("textContent") == "automatic"  # in the closed tiling panel
    assert browser.find_element(By.ID, "param-tile_diffusion_size").get_attribute("disabled") is not None
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == model["name"]
    # help says what a change does, never the fal schema's own description again
    hints = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.field .hint')].map(h => [h.id, h.textContent]))"
    )
    for name, field in CCSRInput.model_json_schema()["properties"].items():
        hint = hints.get(f"param-{name}-hint", "")
        assert field["description"] not in hint, (name, hint)
    label = browser.find_element(By.CSS_SELECTOR, "label[for=param-tile_vae]").get_attribute("textContent")
    assert label.startswith("VAE decode"), label
    wait.until(ec.text_to_be_present_in_element((By.ID, "server-status"), "ready"))

    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    assert "96 × 80" in browser.find_element(By.ID, "output-size").text
    set_number(browser, "param-steps", "100")  # 35 network evaluations: long enough for several progress events
    set_number(browser, "param-seed", "7")
    assert "fal queue API" in browser.find_element(By.ID, "route").text
    code = browser.find_element(By.ID, "code-text").text
    assert "/queue/fal-ai/ccsr" in code and '"steps": 100' in code and '"seed": 7' in code
    assert "tile_" not in code

    browser.find_element(By.ID, "upscale").click()
    seen: list[int] = []
    end = time.monotonic() + 120
    while time.monotonic() < end:
        value, ready, error = browser.execute_script(
            "return [document.getElementById('progress').value,"
            " document.getElementById('result').dataset.ready === 'true',"
            " document.getElementById('error').hidden ? '' : document.getElementById('error').textContent]"
        )
        assert not error, error
        if not seen or seen[-1] != int(value):
            seen.append(int(value))
        if ready:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no result within 120 s; progress seen {seen}\n{server.log()}")
    running = sorted({v for v in seen if 0 < v < 100})
    assert len(running) >= 2, f"the progress bar did not advance in steps: {seen}"
    assert seen[-1] == 100
    assert "Done in" in browser.find_element(By.ID, "progress-text").text
    # what the server planned for the automatic tiling, as its pipeline logged it
    plan = browser.execute_script("return document.getElementById('tile-plan').textContent")
    assert plan.startswith("Planned for the last image: ") and "untiled; VAE decode whole" in plan, plan
    assert "untiled; VAE decode whole" in browser.find_element(By.ID, "result-info").text

    after = browser.find_element(By.ID, "after")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [
        96,
        80,
    ]
    assert "seed 7" in browser.find_element(By.ID, "result-info").text
    # the bicubic "before" layer is drawn at the output size
    canvas = browser.find_element(By.ID, "before-bicubic")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("96", "80")

    # slider: keyboard moves it and the "after" layer's clip follows
    slider = browser.find_element(By.ID, "split")
    slider.send_keys(Keys.HOME)
    assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 0%)"
    for _ in range(30):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert slider.get_attribute("value") == "30"
    assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 30%)"

    # zoom: 200% makes the comparison box twice the output size
    Select(browser.find_element(By.ID, "zoom")).select_by_value("2")
    box = browser.find_element(By.ID, "canvas-box")
    assert (box.size["width"], box.size["height"]) == (192, 160)
    Select(browser.find_element(By.ID, "zoom")).select_by_value("fit")

    # downloads, named <input name>_x<scale>: the server's PNG as is, and a WEBP encoded in the page
    browser.find_element(By.ID, "download").click()
    png = wait_download(downloads, ".png")
    Select(browser.find_element(By.ID, "format")).select_by_value("webp")
    browser.find_element(By.ID, "download").click()
    webp = wait_download(downloads, ".webp")
    assert (png.name, webp.name) == (f"{INPUT.stem}_x2.png", f"{INPUT.stem}_x2.webp")
    for path, fmt in ((png, "PNG"), (webp, "WEBP")):
        with Image.open(path) as im:
            assert (im.format, im.size) == (fmt, (96, 80)), path

    # the same image the API serves
    served = httpx.get(after.get_attribute("src"), timeout=10)
    assert served.status_code == 200 and served.content == png.read_bytes()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.find_element(By.ID, "split").send_keys(Keys.ARROW_RIGHT * 20)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems


def wait_result(browser, server, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, error = browser.execute_script(
            "return [document.getElementById('result').dataset.ready === 'true',"
            " document.getElementById('error').hidden ? '' : document.getElementById('error').textContent]"
        )
        assert not error, error
        if ready:
            return
        time.sleep(0.1)
    raise AssertionError(f"no result within {timeout} s\n{server.log()}")


def test_advanced_settings_go_through_runware(browser, server):
    wait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    set_number(browser, "param-steps", "10")
    summary = browser.find_element(By.CSS_SELECTOR, "#advanced summary")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)  # not under the Upscale bar
    summary.click()
    prompt = browser.find_element(By.ID, "param-positivePrompt")
    prompt.send_keys("a sharp photo")
    assert "Runware task API" in browser.find_element(By.ID, "route").text
    assert browser.find_element(By.ID, "param-t_max").get_attribute("disabled") is not None  # fal only
    assert '"positivePrompt": "a sharp photo"' in browser.find_element(By.ID, "code-text").text
    # a prompt is not run here: the tiny fixture checkpoint cannot encode one (a core issue, reported)
    prompt.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    assert "fal queue API" in browser.find_element(By.ID, "route").text
    set_number(browser, "param-controlNetWeight", "0.8")  # CFG above 1 would double the evaluations
    assert "Runware task API" in browser.find_element(By.ID, "route").text
    browser.find_element(By.ID, "tab-runware").click()
    code = browser.find_element(By.ID, "code-text").text
    assert "rw.run(" in code and '"controlNetWeight": 0.8' in code
    assert '"steps": 10' in code

    browser.find_element(By.ID, "upscale").click()
    wait_result(browser, server)
    after = browser.find_element(By.ID, "after")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [
        96,
        80,
    ]

    # the runware snippet, copied as is, runs against this server with the official SDK
    snippet = browser.execute_script("return document.getElementById('code-text').textContent")
    run = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=90, env=dict(os.environ)
    )
    assert run.returncode == 0, run.stderr
    url = run.stdout.strip()
    assert url.startswith(f"{server.base}/images/") and url.endswith(".png"), run.stdout
    with Image.open(io.BytesIO(httpx.get(url, timeout=10).content)) as im:
        assert im.size == (96, 80)
    browser.find_element(By.ID, "tab-fal").click()
    compile(browser.execute_script("return document.getElementById('code-text').textContent"), "fal.py", "exec")


def test_cancel_stops_the_job(browser, server):
    wait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    set_number(browser, "param-steps", "100")
    browser.find_element(By.ID, "upscale").click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.getElementById('progress').value") > 0)
    browser.find_element(By.ID, "cancel").click()
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "progress-text"), "Cancelled"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "upscale").is_enabled()


def test_not_an_image_shows_the_api_error(browser, server, tmp_path):
    wait = open_page(browser, server)
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image at all, just some text\n" * 4)
    browser.find_element(By.ID, "file").send_keys(str(bogus))
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    shown = browser.find_element(By.ID, "error").text

    # what the API itself answers for the same bytes
    uri = "data:image/png;base64," + base64.b64encode(bogus.read_bytes()).decode()
    r = httpx.post(
        f"{server.base}/v1",
        json=[{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": uri}],
        timeout=10,
    )
    assert r.status_code == 400
    err = r.json()["errors"][0]
    assert f"{err['code']}: {err['message']}" in shown, shown
    assert shown.startswith("HTTP 400")
    assert browser.find_element(By.ID, "upscale").get_attribute("disabled") is not None


def test_blocked_url_shows_the_api_error(browser, server):
    """A pasted URL is fetched by the server, under its SSRF rules; their refusal is what the page shows."""
    wait = open_page(browser, server)
    url = f"{server.base}/images/nothing.png"
    browser.find_element(By.ID, "url").send_keys(url)
    browser.find_element(By.CSS_SELECTOR, "#url-form button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    shown = browser.find_element(By.ID, "error").text
    r = httpx.post(
        f"{server.base}/v1",
        json=[{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": url}],
        timeout=10,
    )
    err = r.json()["errors"][0]
    assert shown == f"HTTP {r.status_code}\n{err['code']}: {err['message']}"


def test_too_large_output_shows_the_api_error(browser, server, tmp_path):
    wait = open_page(browser, server)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1100, 20), (90, 120, 200)).save(wide)
    browser.find_element(By.ID, "file").send_keys(str(wide))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "1100 × 20"))
    set_number(browser, "param-scale", "4")
    assert "4400 × 80 px (over this server's 4096 px limit)" in browser.find_element(By.ID, "output-size").text
    browser.find_element(By.ID, "upscale").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    shown = browser.find_element(By.ID, "error").text
    assert shown == "HTTP 422\nimage_url: The output would be 4400x80; this server's limit is 4096x4096", shown


def test_out_of_range_parameter_shows_the_api_error(browser, server):
    """A value the fal schema refuses is sent anyway (the form does not second-guess the API)."""
    wait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    set_number(browser, "param-steps", "5")
    browser.find_element(By.ID, "upscale").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    shown = browser.find_element(By.ID, "error").text
    assert shown.startswith("HTTP 422") and "steps: Input should be greater than or equal to 10" in shown, shown


def test_page_assets_are_small(server):
    """No build step, no framework: the page and its two assets stay small."""
    total = 0
    for path in ("/", "/playground/static/app.js", "/playground/static/style.css", "/playground/static/favicon.svg"):
        r = httpx.get(f"{server.base}{path}", timeout=10)
        assert r.status_code == 200, path
        total += len(r.content)
    assert total < 80_000
    assert httpx.get(f"{server.base}/playground/static/index.html", timeout=10).status_code == 404
    icon = httpx.get(f"{server.base}/favicon.ico", timeout=10)  # browsers ask for it on every page
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.startswith(b"<svg")


def test_tiling_fields_follow_the_mode(browser, server):
    """Tiling left "automatic" is not sent; sizes apply (and are sent) only once a mode asks for them."""
    wait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    summary = browser.find_element(By.CSS_SELECTOR, "#tiling summary")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
    summary.click()
    assert "plans tiling for each image" in browser.find_element(By.ID, "tile-plan").text

    def code() -> str:
        return browser.execute_script("return document.getElementById('code-text').textContent")

    size = browser.find_element(By.ID, "param-tile_diffusion_size")
    assert not size.is_enabled() and "tile_" not in code()
    Select(browser.find_element(By.ID, "param-tile_diffusion")).select_by_visible_text("mix")
    assert size.is_enabled() and size.get_attribute("placeholder") == "1024"  # fal's default when left empty
    assert '"tile_diffusion": "mix"' in code() and "tile_diffusion_size" not in code()
    set_number(browser, "param-tile_diffusion_size", "512")
    assert '"tile_diffusion_size": 512' in code()
    decoder = browser.find_element(By.ID, "param-tile_vae_decoder_size")
    assert not decoder.is_enabled()
    Select(browser.find_element(By.ID, "param-tile_vae")).select_by_visible_text("tiled")
    assert decoder.is_enabled() and '"tile_vae": true' in code() and "tile_vae_decoder_size" not in code()
    Select(browser.find_element(By.ID, "param-tile_diffusion")).select_by_visible_text("automatic")
    assert not size.is_enabled() and "tile_diffusion" not in code()


def test_model_choice_switches_to_v2_with_its_own_form(browser, server):
    """Choosing CCSR-v2 rebuilds the form from its /playground/models entry (its own defaults and fields) and
    the upscale goes to fal-ai/ccsr-v2."""
    wait = open_page(browser, server)
    v2 = {p["name"]: p for p in httpx.get(f"{server.base}/playground/models", timeout=10).json()[1]["parameters"]}
    Select(browser.find_element(By.ID, "model")).select_by_visible_text("CCSR-v2")
    wait.until(ec.presence_of_element_located((By.ID, "param-process_size")))
    shown = {n: browser.find_element(By.ID, f"param-{n}").get_attribute("value") for n in ("steps", "scale",
                                                                                      "process_size")}
    assert shown == {n: str(v2[n]["default"]) for n in shown} == {"steps": "1", "scale": "4", "process_size": "512"}
    assert "fal-ai/ccsr-v2" in browser.find_element(By.ID, "model-hint").text
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    set_number(browser, "param-seed", "5")
    summary = browser.find_element(By.CSS_SELECTOR, "#advanced summary")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)  # not under the Upscale bar
    summary.click()
    set_number(browser, "param-process_size", "128")  # processed at 192x160: quick on the tiny model
    assert "/queue/fal-ai/ccsr-v2" in browser.find_element(By.ID, "route").text
    browser.find_element(By.ID, "tab-curl").click()
    assert '"process_size":128' in browser.find_element(By.ID, "code-text").text.replace(" ", "")
    browser.find_element(By.ID, "upscale").click()
    wait_result(browser, server)
    after = browser.find_element(By.ID, "after")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", after) == [
        192, 160]
    assert "seed 5" in browser.find_element(By.ID, "result-info").text
