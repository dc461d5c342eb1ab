"""Functional forms of the noise suite."""

__all__: list[str] = []
