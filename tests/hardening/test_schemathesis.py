"""Schemathesis against the app's own OpenAPI spec (in-process ASGI, stand-in runner): no 5xx anywhere.

Only the ``not_a_server_error`` check is asserted: the spec describes the protocols loosely (Runware bodies
are free-form task arrays) so conformance checks would test the spec, not the server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import RunOutput, build_embedded_engine


class _Runner:
    def load(self) -> None:
        pass

    def run(self, job, input_bytes, *, progress, should_cancel, log):
        from hardening_helpers import png_bytes

        return RunOutput(png_bytes((16, 16)), "image/png", "png", 16, 16, 1)


def _app():
    data = Path(tempfile.mkdtemp(prefix="ccsr-schemathesis-"))
    s = Settings(data_dir=data, default_steps=2, max_queue=10_000)
    return create_app(s, build_embedded_engine(data, runner=_Runner(), max_queue=10_000))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
