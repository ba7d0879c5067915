"""Test plugin: raises a Python exception on a row whose content is 'boom', from a nested call,
so a test can check that the exception's message and its traceback reach the host log.
"""

import pgstream


def refuse(event: pgstream.Event) -> None:
    content = event.row.text("content")
    if content == "boom":
        raise ValueError(f"python-error-handler refuses content {content!r}")


def handle(events: list[pgstream.Event]) -> None:
    for event in events:
        refuse(event)


WitWorld = pgstream.export(handle)
