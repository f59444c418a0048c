"""How the playground looks to a user, measured in a real Chromium without screenshots: what must be on screen
is inside the viewport (getBoundingClientRect against the window), labels stay beside their controls, and the
colours of control borders and the focus ring have the contrast WCAG 1.4.11 asks for (3:1)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from tests.web.conftest import Server, serve
from tests.web.test_playground import ARTIFACTS, INPUT, open_page, set_number, wait_result

pytestmark = pytest.mark.timeout(150)
ARTIFACTS.mkdir(parents=True, exist_ok=True)  # screenshots, for people to look at

VIEWPORTS = [(1400, 900), (390, 844)]

IN_VIEW = """
const r = document.getElementById(arguments[0]).getBoundingClientRect();
return [r.top, r.bottom, r.left, r.right, window.innerHeight, window.innerWidth];
"""

SCROLL_DOWN = "window.scrollTo(0, document.documentElement.scrollHeight)"


@pytest.fixture
def viewport(browser, request) -> Iterator[tuple[int, int]]:
    """The exact CSS viewport (the window's own size would include its frame)."""
    width, height = request.param
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    try:
        yield width, height
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def assert_in_view(browser, element_id: str) -> None:
    top, bottom, left, right, height, width = browser.execute_script(IN_VIEW, element_id)
    assert bottom > top, f"#{element_id} is not shown"
    # 1 px of slack: scrolling lands on fractions of a pixel
    assert top >= -1 and bottom <= height + 1 and left >= -1 and right <= width + 1, (
        f"#{element_id} at top {top:.0f}, bottom {bottom:.0f}, left {left:.0f}, right {right:.0f}; "
        f"viewport {width}x{height}"
    )


def wait_shown(browser, element_id: str, timeout: float = 60) -> None:
    WebDriverWait(browser, timeout, poll_frequency=0.02).until(
        lambda d: d.execute_script(f"return !document.getElementById('{element_id}').hidden")
    )


@pytest.mark.parametrize("viewport", VIEWPORTS, indirect=True, ids=lambda v: f"{v[0]}x{v[1]}")
def test_what_matters_is_on_screen(browser, server, viewport):
    """Upscale after choosing an image, progress when it starts, the result's labels beside their controls, and
    an error (a 422 after a finished run) in view, replacing the old result and its "Done in"."""
    width, height = viewport
    wait = open_page(browser, server)
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == [width, height]
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    assert_in_view(browser, "upscale")

    set_number(browser, "param-steps", "10")
    browser.execute_script(SCROLL_DOWN)  # as after setting the last parameters: the result panel's top is gone
    browser.find_element(By.ID, "upscale").click()
    wait_shown(browser, "progress-box")
    assert_in_view(browser, "progress-box")
    wait_result(browser, server)
    assert_in_view(browser, "progress-box")
    assert "Done in" in browser.find_element(By.ID, "progress-text").text

    # each label of the result's toolbars sits on the same line as its control, right before it
    pairs = browser.execute_script(
        """return [...document.querySelectorAll('#result .ctl')].map(c => {
             const l = c.querySelector('label').getBoundingClientRect();
             const i = document.getElementById(c.querySelector('label').htmlFor).getBoundingClientRect();
             return [c.querySelector('label').htmlFor, l.top + l.height / 2, i.top + i.height / 2, l.right, i.left,
                     i.right];
           })"""
    )
    assert len(pairs) == 5
    for control, label_y, control_y, label_right, control_left, control_right in pairs:
        assert abs(label_y - control_y) < 6, f"{control}: label and control on different lines"
        assert label_right <= control_left <= label_right + 16, f"{control}: label not beside its control"
        assert control_right <= width, f"{control} runs off the page"
    browser.save_screenshot(str(ARTIFACTS / f"playground-{width}x{height}.png"))

    set_number(browser, "param-scale", "9")
    browser.execute_script(SCROLL_DOWN)
    browser.find_element(By.ID, "upscale").click()
    wait_shown(browser, "error", 20)
    assert browser.find_element(By.ID, "error").text.startswith("HTTP 422")
    assert_in_view(browser, "error")
    hidden = browser.execute_script("return ['progress-box', 'result'].map(id => document.getElementById(id).hidden)")
    assert hidden == [True, True], "the error is shown beside the previous run's progress or result"


def luminance(rgb: tuple[float, float, float]) -> float:
    c = [x / 255 for x in rgb]
    c = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# [id, border colour, outline colour and style when focused, the colour behind the element] from computed styles
COLOURS = """
const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
const behind = (node) => {
  for (let n = node.parentElement; n; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
  }
  return [255, 255, 255];
};
for (const d of document.querySelectorAll('details')) d.open = true;
return arguments[0].map((id) => {
  const e = document.getElementById(id);
  e.focus();
  const s = getComputedStyle(e);
  const out = [id, rgb(s.borderTopColor).slice(0, 3), rgb(s.outlineColor).slice(0, 3), s.outlineStyle,
               e.matches(':focus-visible'), behind(e)];
  e.blur();
  return out;
});
"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_controls_and_focus_ring_contrast(browser, server, scheme):
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
    )
    try:
        open_page(browser, server)
        ids = ["url", "param-steps", "param-color_fix_type", "param-positivePrompt", "api-key"]
        for id_, border, outline, style, focus_visible, bg in browser.execute_script(COLOURS, ids):
            assert contrast(border, bg) >= 3, f"{scheme}: #{id_} border {border} on {bg}"
            assert focus_visible and style != "none", f"{scheme}: #{id_} shows no focus ring"
            assert contrast(outline, bg) >= 3, f"{scheme}: #{id_} focus ring {outline} on {bg}"
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``ccsr serve`` whose weights are not a checkpoint: it serves, and /readyz reports the failed load."""
    tmp = tmp_path_factory.mktemp("broken-server")
    weights = tmp / "broken.safetensors"
    weights.write_bytes(b"this is not a checkpoint")
    args = ["--weights", str(weights), "--device", "cpu"]
    with serve(tmp, args, lambda r: r.json().get("status") == "failed", threads=1) as srv:
        yield srv


def test_failed_model_is_an_alert_with_its_cause(browser, broken_server):
    cause = httpx.get(f"{broken_server.base}/readyz", timeout=10).json()["error"]
    wait = open_page(browser, broken_server)
    wait.until(ec.visibility_of_element_located((By.ID, "model-error")))
    banner = browser.find_element(By.ID, "model-error")
    assert banner.get_attribute("role") == "alert"
    assert "failed to load" in banner.text and cause in banner.text, banner.text
    assert_in_view(browser, "model-error")
    browser.find_element(By.ID, "file").send_keys(str(INPUT))
    wait.until(ec.text_to_be_present_in_element((By.ID, "input-size"), "48 × 40"))
    assert browser.find_element(By.ID, "upscale").get_attribute("disabled") is not None
    browser.save_screenshot(str(ARTIFACTS / "playground-failed-model.png"))
