"""Credit suite: credit-assignment signals against ground truth. (filled by the credit issue)"""

__all__: list[str] = []
