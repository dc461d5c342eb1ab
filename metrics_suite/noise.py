"""Noise suite: what a privacy transform adds to its input. (filled by the noise issue)"""

__all__: list[str] = []
