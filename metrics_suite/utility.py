"""Utility suite: does the transformed model still do its job? (filled by the utility issue)"""

__all__: list[str] = []
