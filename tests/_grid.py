"""Just enough of a Flower Grid for a strategy's ``configure_*`` steps: the connected node ids."""

from __future__ import annotations


class FakeGrid:
    def __init__(self, n: int) -> None:
        self.ids = [1000 + 37 * i for i in range(n)]

    def get_node_ids(self) -> list[int]:
        return list(self.ids)
