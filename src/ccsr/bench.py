"""Placeholder replaced by the benchmark helper."""


def add_commands(sub) -> None:  # type: ignore[no-untyped-def]
    return None
