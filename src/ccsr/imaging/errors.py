"""The one error type of the imaging module: a short machine code plus one human line."""

from __future__ import annotations


class ImageError(ValueError):
    """An input image (or an output request) that ccsr refuses.

    ``code`` is a short stable machine code that protocols map to their own error shapes:

    ``unsupported_format`` (not one of the allowed formats, sniffed from the bytes), ``too_large_bytes``,
    ``too_many_pixels`` (checked from the header, before decoding), ``too_large_output``, ``animated``,
    ``truncated``, ``corrupt``, ``unsupported_mode`` (e.g. float or LAB pixels), ``invalid_option``,
    ``model_output`` (the model returned something of the wrong shape).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
