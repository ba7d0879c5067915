"""Accepts every batch without looking at it: what remains is the cost of passing events into
a Python guest (lifting them into Python objects), which the per-language benchmark compares
with the Rust `noop-handler`.
"""

import wit_world


class WitWorld(wit_world.WitWorld):
    def handle(self, events) -> None:
        pass
