"""The README's ``fal_client`` recipe, run as written against a real ``ccsr serve`` on loopback (issue 17.8).

The server is started with the README's ``--tls-self-signed DIR``; the client gets the environment of the
README's ``export`` line (only the port and the certificate folder substituted) and runs its ``python -c`` line.
Nothing in the client is patched: if the documented variables sent ``submit`` to the wrong route, this fails.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from tests.conftest import REPO, TINY_CONFIG, TINY_WEIGHTS

pytest.importorskip("fal_client")


def readme_recipe() -> tuple[str, dict[str, str], str]:
    """(the serve line, the exported variables, the python -c program) of the README's fal recipe."""
    text = (REPO / "README.md").read_text()
    serve = re.search(r"^\s*(ccsr serve --tls-self-signed \S+)\s*$", text, re.M)
    export = re.search(r"^\s*export (.*FAL_QUEUE_RUN_HOST=.*)$", text, re.M)
    program = re.search(r"^\s*python -c (.*fal_client.*)$", text, re.M)
    assert serve and export and program, "the README's fal_client recipe is gone"
    variables = dict(item.split("=", 1) for item in shlex.split(export.group(1)))
    return serve.group(1), variables, shlex.split(program.group(1))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_fal_client_recipe_submits_to_the_queue(tmp_path):
    serve_line, variables, program = readme_recipe()
    certs = serve_line.split()[-1]  # the README's certificate folder, made inside tmp_path
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "ccsr.cli", *serve_line.split()[1:], "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--weights", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG),
         "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
        cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        cert = tmp_path / certs / "cert.pem"
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=2) as c:
                    if c.get(f"https://127.0.0.1:{port}/readyz").status_code == 200:
                        break
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"ccsr serve did not become ready: {server.stderr.read() if server.poll() is not None else ''}")
        rng = np.random.default_rng(3)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        (tmp_path / "in.png").write_bytes(buf.getvalue())
        client_env = {k: v for k, v in environment.items() if not k.startswith(("FAL_", "SSL_CERT"))}
        client_env.update({k: v.replace("8000", str(port)) for k, v in variables.items()})
        # a cheap upscale (2 evaluations at 256 px); the README's program prints the result of submit(...).get()
        cheap = {"scale": 2, "steps": 10, "t_max": 0.2, "t_min": 0.1, "tile_diffusion": "mix",
                 "tile_diffusion_size": 256, "tile_diffusion_stride": 128, "seed": 5}
        args = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in cheap.items()) + ", "
        client = subprocess.run([sys.executable, "-c", program.replace("{", args, 1)], cwd=tmp_path,
                                env=client_env, capture_output=True, text=True, timeout=600)
        assert client.returncode == 0, client.stderr[-3000:]
        out = ast.literal_eval(client.stdout.strip())  # the program prints the result dict
        url = out["image"]["url"]
        assert out["image"]["width"] == 48 and out["image"]["height"] == 40
        assert url.startswith(f"https://127.0.0.1:{port}/")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as c:
            got = Image.open(io.BytesIO(c.get(url).content))
        assert got.size == (48, 40)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
