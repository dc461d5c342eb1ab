"""Functional forms of the utility suite."""

__all__: list[str] = []
