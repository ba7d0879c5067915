"""Unit tests of the Python helper module `pgstream` (examples/python-handler/pgstream.py).

They run natively (no wasm): the WIT types are the real ones componentize-py generates for
wit/ (`make test-python` puts them on PYTHONPATH), and the host functions, which only exist
inside a component, are replaced by recorders.
"""

import datetime as dt
import json
import unittest
from decimal import Decimal
from unittest import mock

import pgstream
from componentize_py_types import Err
from pgstream import UNCHANGED, Operation, PointKey, TypeOid, WritePlan
from wit_world.imports import types


def column(name, oid, value):
    if isinstance(value, str):
        value = types.Value_Text(value)
    elif value is None:
        value = types.Value_Null()
    return types.Column(name, oid, value)


def event(operation, row, old_row=None, key_columns=("id",)):
    return pgstream.Event(
        types.ChangeEvent(
            operation, "public", "docs", row, old_row, list(key_columns), 1, 0, 7
        )
    )


def key(id, table="docs"):
    return PointKey("public", table, [id])


class DecodeTest(unittest.TestCase):
    def test_values_decode_by_type_oid(self):
        row = event(
            Operation.INSERT,
            [
                column("i2", TypeOid.INT2, "-3"),
                column("i8", TypeOid.INT8, "9223372036854775807"),
                column("f", TypeOid.FLOAT8, "1e+20"),
                column("nan", TypeOid.FLOAT4, "NaN"),
                column("n", TypeOid.NUMERIC, "12.50"),
                column("ok", TypeOid.BOOL, "t"),
                column("doc", TypeOid.JSONB, '{"a": [1, 2]}'),
                column("bin", TypeOid.BYTEA, "\\x00ff"),
                column("d", TypeOid.DATE, "2000-03-01"),
                column("ts", TypeOid.TIMESTAMP, "2024-05-01 12:30:00.25"),
                column("tz", TypeOid.TIMESTAMPTZ, "2024-05-01 05:00:00-05:30"),
                column("title", TypeOid.TEXT, "héllo"),
                column("u", TypeOid.UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ],
        ).row
        self.assertEqual(row.get("i2"), -3)
        self.assertEqual(row.get("i8"), 2**63 - 1)
        self.assertEqual(row.get("f"), 1e20)
        self.assertNotEqual(row.get("nan"), row.get("nan"))
        self.assertEqual(row.get("n"), Decimal("12.50"))
        self.assertIs(row.get("ok"), True)
        self.assertEqual(row["doc"], {"a": [1, 2]})
        self.assertEqual(row.get("bin"), b"\x00\xff")
        self.assertEqual(row.get("d"), dt.date(2000, 3, 1))
        self.assertEqual(row.get("ts"), dt.datetime(2024, 5, 1, 12, 30, 0, 250000))
        self.assertIsNone(row.get("ts").tzinfo)
        tz = row.get("tz")
        self.assertEqual(tz.utcoffset(), -dt.timedelta(hours=5, minutes=30))
        self.assertEqual(
            tz, dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc)
        )
        self.assertEqual(row.get("title"), "héllo")
        self.assertEqual(row.get("u"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")

    def test_null_and_unchanged_stay_apart(self):
        row = event(
            Operation.UPDATE,
            [
                column("gone", TypeOid.INT4, None),
                column("content", TypeOid.TEXT, types.Value_Unchanged()),
            ],
        ).row
        self.assertIsNone(row.get("gone"))
        self.assertIsNone(row.text("gone"))
        self.assertIs(row.get("content"), UNCHANGED)
        self.assertIs(row.text("content"), UNCHANGED)
        self.assertIsNot(UNCHANGED, None)
        self.assertIs(pgstream.Unchanged(), UNCHANGED)
        with self.assertRaises(TypeError):
            bool(row.get("content"))

    def test_bad_text_and_missing_columns_raise_typed_errors(self):
        row = event(
            Operation.INSERT,
            [
                column("n", TypeOid.INT4, "twelve"),
                column("tz", TypeOid.TIMESTAMPTZ, "2024-05-01 12:30:00"),
                column("far", TypeOid.TIMESTAMP, "infinity"),
                column("bc", TypeOid.DATE, "0044-03-15 BC"),
                column("end", TypeOid.TIMESTAMP, "9999-12-31 24:00:00"),
            ],
        ).row
        for name in ("n", "tz", "far", "bc", "end"):
            with self.subTest(name), self.assertRaises(pgstream.FieldError) as raised:
                row.get(name)
            self.assertEqual(raised.exception.column, name)
            self.assertIsInstance(raised.exception, ValueError)
        self.assertEqual(row.text("far"), "infinity")
        with self.assertRaises(pgstream.MissingColumn) as raised:
            row.get("nope")
        self.assertIsInstance(raised.exception, KeyError)
        self.assertIn("nope", str(raised.exception))

    def test_end_of_day_rolls_over(self):
        self.assertEqual(
            pgstream.decode("2024-02-29 24:00:00", TypeOid.TIMESTAMP),
            dt.datetime(2024, 3, 1),
        )


class RowJsonTest(unittest.TestCase):
    def test_values_are_typed_like_the_rust_sdk(self):
        update = event(
            Operation.UPDATE,
            [
                column("id", TypeOid.INT8, "7"),
                column("price", TypeOid.NUMERIC, "NaN"),
                column("ok", TypeOid.BOOL, "f"),
                column("meta", TypeOid.JSONB, '{"k": "v"}'),
                column("title", TypeOid.TEXT, 'a "quoted"\nline\x01'),
                column("gone", TypeOid.TEXT, None),
                column("content", TypeOid.TEXT, types.Value_Unchanged()),
            ],
        )
        text = update.row_json()
        # Same text as the Rust SDK's row_json for this row (guest-sdk/src/json.rs tests).
        self.assertEqual(
            text,
            '{"id":7,"price":"NaN","ok":false,"meta":{"k": "v"},'
            '"title":"a \\"quoted\\"\\nline\\u0001","gone":null}',
        )
        self.assertEqual(json.loads(text)["title"], 'a "quoted"\nline\x01')

    def test_unchanged_columns_come_from_the_old_row_and_skip_leaves_out(self):
        update = event(
            Operation.UPDATE,
            [
                column("id", TypeOid.INT8, "7"),
                column("body", TypeOid.TEXT, types.Value_Unchanged()),
                column("content", TypeOid.TEXT, "new"),
            ],
            old_row=[
                column("id", TypeOid.INT8, "7"),
                column("body", TypeOid.TEXT, "old body"),
                column("content", TypeOid.TEXT, "old"),
            ],
        )
        self.assertEqual(update.row_json(skip=["content"]), '{"id":7,"body":"old body"}')

    def test_a_row_is_partial_when_an_unchanged_column_has_no_old_value(self):
        row = [column("id", TypeOid.INT4, "5"), column("content", TypeOid.TEXT, types.Value_Unchanged())]
        self.assertTrue(event(Operation.UPDATE, row).is_partial())
        self.assertTrue(
            event(Operation.UPDATE, row, old_row=[column("id", TypeOid.INT4, "5")]).is_partial()
        )
        full_old = [column("id", TypeOid.INT4, "5"), column("content", TypeOid.TEXT, "kept")]
        self.assertFalse(event(Operation.UPDATE, row, old_row=full_old).is_partial())
        sent = [column("id", TypeOid.INT4, "5"), column("content", TypeOid.TEXT, "sent")]
        self.assertFalse(event(Operation.UPDATE, sent).is_partial())


class PointKeyTest(unittest.TestCase):
    def test_key_follows_key_column_order_and_rejects_missing_values(self):
        delete = event(
            Operation.DELETE,
            [column("id", TypeOid.INT4, "5"), column("tenant", TypeOid.TEXT, "acme")],
            key_columns=("tenant", "id"),
        )
        self.assertEqual(delete.point_key(), PointKey("public", "docs", ["acme", "5"]))
        delete.raw.row[0].value = types.Value_Null()
        with self.assertRaises(pgstream.MissingKey):
            delete.point_key()

    def test_old_point_key_is_none_without_key_columns(self):
        update = event(
            Operation.UPDATE,
            [column("id", TypeOid.INT4, "2")],
            old_row=[column("id", TypeOid.INT4, "1")],
        )
        self.assertEqual(update.old_point_key(), key("1"))
        update.raw.old_row = [column("other", TypeOid.INT4, "1")]
        self.assertIsNone(update.old_point_key())


class WritePlanTest(unittest.TestCase):
    def test_last_action_per_point_wins_and_kept_vectors_keep_the_pending_text(self):
        plan = WritePlan()
        plan.upsert(key("1"), "first", '{"v":1}')
        plan.delete(key("2"))
        plan.upsert(key("2"), "again", "{}")
        plan.upsert(key("1"), None, '{"v":2}')
        plan.upsert(key("3"), "gone", "{}")
        plan.delete(key("3"))
        plan.upsert(key("4"), None, '{"only":"payload"}')

        truncated, deletes, texts, upserts, merges = plan.calls()
        self.assertEqual(truncated, [])
        self.assertEqual(merges, [])
        self.assertEqual(deletes, [key("3")])
        self.assertEqual(texts, ["first", "again"])
        self.assertEqual(
            upserts,
            [
                (key("1"), 0, '{"v":2}'),
                (key("2"), 1, "{}"),
                (key("4"), None, '{"only":"payload"}'),
            ],
        )

    def test_truncate_drops_earlier_writes_of_its_table_only(self):
        plan = WritePlan()
        plan.upsert(key("1"), "a", "{}")
        plan.upsert(key("1", table="other"), "b", "{}")
        plan.delete(key("9"))
        plan.truncate("public", "docs")
        plan.upsert(key("2"), "c", "{}")
        truncated, deletes, texts, upserts, _ = plan.calls()
        self.assertEqual(truncated, [("public", "docs")])
        self.assertEqual(deletes, [])
        self.assertEqual(texts, ["b", "c"])
        self.assertEqual(len(upserts), 2)

    def test_merges_follow_the_upsert_of_their_point_and_take_its_text(self):
        # The same sequence as the Rust SDK's test of the same name: the calls must match.
        plan = WritePlan()
        plan.upsert(key("1"), "first", '{"v":1}')
        plan.merge(key("1"), None, '{"n":1}')
        plan.merge(key("2"), None, '{"n":2}')
        plan.merge(key("2"), "second", '{"n":3}')
        plan.delete(key("3"))
        plan.merge(key("3"), "third", '{"n":4}')
        plan.merge(key("4"), None, '{"n":5}')
        plan.upsert(key("4"), None, '{"v":4}')
        truncated, deletes, texts, upserts, merges = plan.calls()
        self.assertEqual(deletes, [key("3")])
        self.assertEqual(texts, ["first", "second", "third"])
        self.assertEqual(upserts, [(key("1"), 0, '{"v":1}'), (key("4"), None, '{"v":4}')])
        self.assertEqual(
            merges,
            [
                (key("1"), None, '{"n":1}'),
                (key("2"), 1, '{"n":2}'),
                (key("2"), None, '{"n":3}'),
                (key("3"), 2, '{"n":4}'),
            ],
        )

    def test_execute_makes_one_call_of_each_kind_in_order(self):
        calls = []
        host = mock.Mock()
        host.delete_table.side_effect = lambda s, t: calls.append(("delete-table", s, t))
        host.delete.side_effect = lambda keys: calls.append(("delete", keys))
        host.embed.side_effect = lambda texts: (
            calls.append(("embed", texts)) or [[float(len(t))] for t in texts]
        )
        host.upsert.side_effect = lambda points: calls.append(("upsert", points))
        host.merge.side_effect = lambda points: calls.append(("merge", points))
        plan = WritePlan()
        plan.truncate("public", "old")
        plan.upsert(key("1"), "one", "{}")
        plan.delete(key("2"))
        plan.upsert(key("3"), None, '{"p":1}')
        plan.upsert(key("4"), "four!", "{}")
        plan.merge(key("5"), "five", '{"m":5}')
        with mock.patch.object(pgstream, "_host", host):
            plan.execute()
        self.assertEqual(
            [call[0] for call in calls], ["delete-table", "delete", "embed", "upsert", "merge"]
        )
        self.assertEqual(calls[4][1], [types.Point(key("5"), [4.0], '{"m":5}')])
        self.assertEqual(calls[2], ("embed", ["one", "four!", "five"]))
        self.assertEqual(
            calls[3][1],
            [
                types.Point(key("1"), [3.0], "{}"),
                types.Point(key("3"), None, '{"p":1}'),
                types.Point(key("4"), [5.0], "{}"),
            ],
        )

    def test_host_errors_become_host_error(self):
        host = mock.Mock()
        host.embed.side_effect = Err(types.Error("model not loaded"))
        plan = WritePlan()
        plan.upsert(key("1"), "one", "{}")
        with mock.patch.object(pgstream, "_host", host), self.assertRaises(
            pgstream.HostError
        ) as raised:
            plan.execute()
        self.assertEqual(str(raised.exception), "embed failed: model not loaded")


class ExportTest(unittest.TestCase):
    def test_exceptions_become_the_wit_error_with_message_and_traceback(self):
        def inner(events):
            raise ValueError(f"cannot handle {len(events)} events")

        def handle(events):
            inner(events)

        world = pgstream.export(handle)()
        with self.assertRaises(Err) as raised:
            world.handle([event(Operation.INSERT, [column("id", TypeOid.INT4, "1")]).raw])
        error = raised.exception.value
        self.assertIsInstance(error, types.Error)
        lines = error.message.splitlines()
        self.assertEqual(lines[0], "ValueError: cannot handle 1 events")
        self.assertEqual(lines[1], "Traceback (most recent call last):")
        frames = [line.strip() for line in lines if line.strip().startswith('File "')]
        self.assertEqual(len(frames), 2, error.message)
        self.assertTrue(frames[0].endswith("in handle"), error.message)
        self.assertTrue(frames[1].endswith("in inner"), error.message)

    def test_import_errors_say_imports_happen_at_build_time(self):
        def handle(events):
            import a_module_that_is_not_bundled  # noqa: F401

        with self.assertRaises(Err) as raised:
            pgstream.export(handle)().handle([])
        headline = raised.exception.value.message.splitlines()[0]
        self.assertIn("ModuleNotFoundError", headline)
        self.assertIn("top level", headline)

    def test_handler_sees_events(self):
        seen = []
        world = pgstream.export(lambda events: seen.extend(events))()
        world.handle([event(Operation.DELETE, [column("id", TypeOid.INT4, "4")]).raw])
        self.assertEqual([e.point_key() for e in seen], [key("4")])


if __name__ == "__main__":
    unittest.main()
