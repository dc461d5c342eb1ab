"""Functional forms of the credit suite."""

__all__: list[str] = []
