#!/usr/bin/env bash
# Finds or installs Debian's PostgreSQL 15 server (no pgvector) for the end-to-end tests and
# writes the path of its bin directory to the file named by $1.
#
# Order of preference, cheapest first:
#   1. the system package is already there (the project's machine image ships postgresql-15);
#   2. the .debs are cached in .cache/debs from an earlier run: unpack them;
#   3. `apt-get download` the server package (works as any user once the apt lists exist; as root
#      the lists are refreshed first if apt knows no candidate) and unpack it with `dpkg -x`.
# Unpacking instead of `apt-get install` needs no root, starts no system cluster on port 5432 and
# leaves the machine as it was. Postgres finds its share/ and lib/ relative to its binary, so the
# unpacked tree runs from wherever it lies. Its shared libraries (libicu, libssl, libxml2, ...)
# are the ones every Debian 12 machine with a libpq has; the check at the end fails loudly if not.
set -euo pipefail

out=${1:?usage: install-postgres15.sh OUTPUT_FILE}
cache=$(dirname "$out")
system_bin=/usr/lib/postgresql/15/bin

if [[ -x $system_bin/postgres && -x $system_bin/initdb && -x $system_bin/pg_ctl ]]; then
    bin=$system_bin
else
    debs=$cache/debs
    root=$cache/pg15
    mkdir -p "$debs"
    if ! compgen -G "$debs/postgresql-15_*.deb" >/dev/null; then
        if [[ $(id -u) == 0 ]] && ! apt-cache policy postgresql-15 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
            apt-get update -qq
        fi
        # apt downloads into the current directory; a subshell keeps ours.
        (cd "$debs" && apt-get download -qq postgresql-15)
    fi
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    for deb in "$debs"/postgresql-15_*.deb; do
        dpkg -x "$deb" "$root.tmp"
    done
    rm -rf "$root"
    mv "$root.tmp" "$root"
    bin=$root/usr/lib/postgresql/15/bin
fi

missing=$(ldd "$bin/postgres" | grep 'not found' || true)
if [[ -n $missing ]]; then
    echo "PostgreSQL 15 at $bin lacks shared libraries:" >&2
    echo "$missing" >&2
    echo "install them with: apt-get install -y postgresql-15" >&2
    exit 1
fi
"$bin/postgres" --version >/dev/null
echo "$bin" >"$out"
