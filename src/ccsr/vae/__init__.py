"""VAE helpers: tiled encoder/decoder with GroupNorm statistics synchronised across tiles (CCSR-v1), or, for the
decoder with ``stats="estimate"``, estimated from a downscaled pass so that memory stays bounded by one tile."""

from ccsr.vae.tiled import STATS_MODES, split_tiles, tiled_decode, tiled_encode

__all__ = ["STATS_MODES", "split_tiles", "tiled_decode", "tiled_encode"]
