"""Limits: bytes, pixels from the header (the 14000x14000 bomb, with bounded memory), Pillow's bomb
warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ccsr.imaging
from ccsr.imaging import ImageError, Limits, decode, upscale_bytes

from .corpus import LanczosModel, pattern, png_bomb, save


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(14000)


def test_bomb_refused_from_header(bomb):
    assert len(bomb) < 1_000_000  # a small file that would inflate to 196 MB of pixels
    with pytest.raises(ImageError) as e:
        decode(bomb)
    assert e.value.code == "too_many_pixels" and "14000x14000" in e.value.message


def test_bomb_memory_stays_bounded(bomb, tmp_path):
    """In a fresh process (so earlier tests cannot hide the peak): decoding the bomb must not allocate its
    196 MB of pixels. ru_maxrss is the process's peak resident size."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    script = (
        "import resource, sys\n"
        "from ccsr.imaging import ImageError, decode\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode(data)\n    print('decoded')\n"
        "except ImageError as e:\n    print(e.code)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    src = str(Path(ccsr.imaging.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out[0] == "too_many_pixels"
    assert int(out[1]) < 40, f"decode of the bomb grew the peak RSS by {out[1]} MiB"


def test_pillow_bomb_warning_is_an_error(bomb):
    """With our own cap raised above Pillow's (89 MP), where Pillow would only warn, it is still an error."""
    with pytest.raises(ImageError) as e:
        decode(png_bomb(10000), Limits(max_input_pixels=10**9))
    assert e.value.code == "too_many_pixels"


def test_pixel_limit_is_configurable():
    data = save(pattern(11, 10), "PNG")
    with pytest.raises(ImageError) as e:
        decode(data, Limits(max_input_pixels=100))
    assert e.value.code == "too_many_pixels"
    assert decode(data, Limits(max_input_pixels=110)).size == (11, 10)


def test_byte_limit():
    data = save(pattern(40, 40), "PNG")
    with pytest.raises(ImageError) as e:
        decode(data, Limits(max_input_bytes=len(data) - 1))
    assert e.value.code == "too_large_bytes"
    with pytest.raises(ImageError) as e:
        upscale_bytes(data, LanczosModel(2), limits=Limits(max_input_bytes=100))
    assert e.value.code == "too_large_bytes"


def test_error_is_a_value_error_with_code_and_message():
    with pytest.raises(ValueError) as e:
        decode(b"nope")
    assert e.value.code == "unsupported_format" and isinstance(e.value.message, str)


def test_no_eval_like_pillow_apis():
    """CVE-2022-22817 / CVE-2023-50447: ImageMath.eval and friends never see user input, because they are not
    used at all."""
    src = Path(ccsr.imaging.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "ImageMath" not in text and "eval(" not in text and "exec(" not in text, f.name
