"""VAE helpers: tiled encoder/decoder with GroupNorm statistics synchronised across tiles (CCSR-v1)."""

from ccsr.vae.tiled import split_tiles, tiled_decode, tiled_encode

__all__ = ["split_tiles", "tiled_decode", "tiled_encode"]
