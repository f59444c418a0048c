"""Samplers: small functions over an epsilon model, a schedule and a progress callback."""
