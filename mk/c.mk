# C handlers: the toolchain, the example and test components, the helper's unit test.
#
# A C handler becomes a component in three steps:
#   1. `wit-bindgen c` turns wit/handler.wit into handler.h/handler.c (the canonical ABI glue)
#      and handler_component_type.o (the component type, as a custom section);
#   2. zig's bundled clang + wasi-libc compiles everything to a wasm32-wasi (preview 1)
#      reactor module (`-mexec-model=reactor`: a library with exports, no main), and
#      mk/wasm_strip_debug.py drops its DWARF but keeps the function names;
#   3. jco wraps the module in a component, adapting its preview-1 imports to preview 2 with
#      the reactor adapter jco ships (mk/node-tools.mk).
# The helper examples/c-handler/pgstream.{h,c} is shared by every C guest here, and
# `pgstream-host new --lang c` writes it (and mk/wasm_strip_debug.py) into new projects.
#
# Toolchain, pinned and installed once into .cache:
#   - zig from the PyPI wheel `ziglang` (clang and wasi-libc inside; a venv of its own);
#   - wit-bindgen-cli from crates.io, the release of the wit-bindgen the Rust guest SDK uses,
#     C generator only. Building it takes minutes: it is never rebuilt unless the pin changes.
# Included by the root Makefile, which defines CACHE, TARGET_DIR, WASM_DIR, PYTHON.

ZIGLANG_VERSION := 0.17.0
WIT_BINDGEN_VERSION := 0.61.1

ZIG_VENV := $(CACHE)/zig-venv
ZIG_STAMP := $(CACHE)/zig-$(ZIGLANG_VERSION).stamp
# A stable path to the zig binary inside the wheel (zig finds its lib/ next to the real file).
ZIG := $(CACHE)/zig-$(ZIGLANG_VERSION)/zig
WIT_BINDGEN_ROOT := $(CACHE)/wit-bindgen-cli-$(WIT_BINDGEN_VERSION)
WIT_BINDGEN := $(WIT_BINDGEN_ROOT)/bin/wit-bindgen
C_TOOLS_ENV := $(CACHE)/c-tools.env

# zig caches compiled wasi-libc and objects; keep that in .cache, not in $HOME.
export ZIG_GLOBAL_CACHE_DIR := $(CACHE)/zig-cache
export ZIG_LOCAL_CACHE_DIR := $(CACHE)/zig-cache

C_BUILD := $(TARGET_DIR)/c-guests
C_BINDINGS := $(C_BUILD)/bindings
C_HELPER_DIR := examples/c-handler
C_HELPER := $(C_HELPER_DIR)/pgstream.h $(C_HELPER_DIR)/pgstream.c
# No -s: it would drop the function names along with the DWARF, and the names are what makes
# a trap's wasm backtrace readable; mk/wasm_strip_debug.py drops only the DWARF.
C_WASM_FLAGS := -target wasm32-wasi -mexec-model=reactor -O2 -std=c11 \
	-Wall -Wextra -Werror -I$(C_BINDINGS) -I$(C_HELPER_DIR)

LANG_GUESTS += guests-c
LANG_TOOL_ENVS += $(C_TOOLS_ENV)

.PHONY: guests-c c-tools test-c

guests-c: $(WASM_DIR)/c-handler.wasm $(WASM_DIR)/c-noop.wasm $(WASM_DIR)/c-error-handler.wasm

c-tools: $(ZIG_STAMP) $(WIT_BINDGEN) $(NODE_TOOLS_STAMP)

$(ZIG_STAMP):
	rm -rf $(ZIG_VENV) $(CACHE)/zig-*.stamp $(dir $(ZIG))
	$(call make-venv,$(ZIG_VENV))
	ls $(CACHE)/wheels/ziglang-$(ZIGLANG_VERSION)-*.whl >/dev/null 2>&1 || \
		$(ZIG_VENV)/bin/pip download --quiet --no-deps --dest $(CACHE)/wheels \
			ziglang==$(ZIGLANG_VERSION)
	$(ZIG_VENV)/bin/pip install --quiet --no-deps --no-index --find-links $(CACHE)/wheels \
		ziglang==$(ZIGLANG_VERSION)
	mkdir -p $(dir $(ZIG))
	ln -sf "$$($(ZIG_VENV)/bin/python -c 'import ziglang, os; print(os.path.dirname(ziglang.__file__))')/zig" $(ZIG)
	[[ "$$($(ZIG) version)" == "$(ZIGLANG_VERSION)" ]] || { echo "c: zig did not install" >&2; exit 1; }
	touch $@

# Its own target directory (cargo's temporary one): the workspace's would serialise it with
# every other build, and nothing compiled for it is shared.
$(WIT_BINDGEN):
	env -u CARGO_TARGET_DIR cargo install --locked --quiet --root $(WIT_BINDGEN_ROOT) \
		--version $(WIT_BINDGEN_VERSION) --no-default-features --features c wit-bindgen-cli

$(C_TOOLS_ENV): $(ZIG_STAMP) $(WIT_BINDGEN) $(NODE_TOOLS_STAMP) mk/c.mk
	{ \
		echo "export PGSTREAM_ZIG=$(ZIG)"; \
		echo "export PGSTREAM_WIT_BINDGEN=$(WIT_BINDGEN)"; \
		echo "export PGSTREAM_WASI_REACTOR_ADAPTER=$(WASI_REACTOR_ADAPTER)"; \
		echo "export PGSTREAM_JCO=$(JCO)"; \
	} >$@.tmp
	mv $@.tmp $@

$(C_BINDINGS)/handler.h: wit/handler.wit $(WIT_BINDGEN)
	rm -rf $(C_BINDINGS)
	$(WIT_BINDGEN) c wit --world handler --out-dir $(C_BINDINGS) >/dev/null

# $(call c_component,NAME,SOURCES): builds $(WASM_DIR)/NAME.wasm from the C files SOURCES plus
# the generated glue.
define c_component
$(WASM_DIR)/$(1).wasm: $(2) $(C_HELPER) $(C_BINDINGS)/handler.h $(ZIG_STAMP) $(NODE_TOOLS_STAMP) \
		mk/c.mk mk/wasm_strip_debug.py
	@echo "building guest $(1)"
	@mkdir -p $(C_BUILD) $(WASM_DIR)
	$(ZIG) cc $(C_WASM_FLAGS) $(2) $(C_BINDINGS)/handler.c $(C_BINDINGS)/handler_component_type.o \
		-o $(C_BUILD)/$(1).wasm
	$(PYTHON) mk/wasm_strip_debug.py $(C_BUILD)/$(1).wasm $(C_BUILD)/$(1).core.wasm
	$(JCO) new $(C_BUILD)/$(1).core.wasm \
		--adapt wasi_snapshot_preview1=$(WASI_REACTOR_ADAPTER) -o $$@.tmp
	mv $$@.tmp $$@
endef

$(eval $(call c_component,c-handler,$(C_HELPER_DIR)/handler.c $(C_HELPER_DIR)/pgstream.c))
$(eval $(call c_component,c-noop,examples/c-noop/noop.c))
$(eval $(call c_component,c-error-handler,tests/plugins/c-error-handler/error_handler.c $(C_HELPER_DIR)/pgstream.c))

# The helper's unit test, native (fast, and the sanitizer catches undefined behaviour): the
# host imports are faked, allocations counted to prove a batch frees what it allocates.
C_TEST_BIN := $(C_BUILD)/pgstream-test
C_TEST_FLAGS := -std=c11 -O1 -g -Wall -Wextra -Werror -fsanitize=undefined \
	-fno-sanitize-recover=all -I$(C_BINDINGS) -I$(C_HELPER_DIR)
test: test-c
test-c: $(C_HELPER) $(C_HELPER_DIR)/pgstream_test.c $(C_BINDINGS)/handler.h $(ZIG_STAMP)
	@mkdir -p $(C_BUILD)
	$(ZIG) cc $(C_TEST_FLAGS) -Dmalloc=counted_malloc -Drealloc=counted_realloc -Dfree=counted_free \
		-c $(C_HELPER_DIR)/pgstream.c -o $(C_BUILD)/pgstream-counted.o
	$(ZIG) cc $(C_TEST_FLAGS) $(C_HELPER_DIR)/pgstream_test.c $(C_BUILD)/pgstream-counted.o \
		-o $(C_TEST_BIN) -lm
	$(C_TEST_BIN)
