# JavaScript/TypeScript handlers: examples/js-handler (TypeScript), the no-op examples/js-noop
# (plain JS, for the benchmark) and the error plugin tests/plugins/js-error-handler, built into
# $(WASM_DIR)/<name>.wasm. Included by the root Makefile.
#
# A handler is built in three steps, all offline with the tools of mk/node-tools.mk:
#   1. tsc --noEmit type-checks the TypeScript against the declarations generated from the WIT;
#   2. rolldown bundles the handler and its modules (pgstream.ts) into one ES module, leaving
#      the `pgstream:handler/...` imports to the component;
#   3. componentize-qjs --sync embeds the bundle in the QuickJS engine (snapshotted with Wizer)
#      and makes the component. --sync: the host does not enable component-model async.
# The engine is QuickJS rather than StarlingMonkey (componentize-js) on measured figures: see
# docs/handlers/javascript.md. `make guests-js-starlingmonkey` builds the StarlingMonkey no-op
# for comparison.

JS_BIN := $(NODE_TOOLS)/node_modules/.bin
TSC := $(JS_BIN)/tsc
ROLLDOWN := $(JS_BIN)/rolldown
COMPONENTIZE_QJS := $(JS_BIN)/componentize-qjs
JS_BUILD := $(TARGET_DIR)/js-build
JS_TYPES := examples/js-handler/types/pgstream-handler.d.ts
JS_TOOLS_ENV := $(CACHE)/js-tools.env

LANG_GUESTS += guests-js
LANG_TOOL_ENVS += $(JS_TOOLS_ENV)

.PHONY: guests-js js-types js-test guests-js-starlingmonkey

guests-js: $(WASM_DIR)/js-handler.wasm $(WASM_DIR)/js-noop.wasm $(WASM_DIR)/js-error-handler.wasm

$(JS_TOOLS_ENV): $(NODE_TOOLS_STAMP) mk/js.mk
	{ \
		echo "export PGSTREAM_JCO=$(JCO)"; \
		echo "export PGSTREAM_COMPONENTIZE_QJS=$(COMPONENTIZE_QJS)"; \
		echo "export PGSTREAM_ROLLDOWN=$(ROLLDOWN)"; \
		echo "export PGSTREAM_TSC=$(TSC)"; \
	} >$@

# The declarations are committed (editors need them before any build; `pgstream-host new
# --lang js` writes them, with the helper, into new projects); this checks that they are what
# the WIT generates today.
$(JS_BUILD)/types.checked: wit/handler.wit mk/js/wit-types.mjs $(JS_TYPES) $(NODE_TOOLS_STAMP)
	mkdir -p $(JS_BUILD)
	node mk/js/wit-types.mjs $(NODE_TOOLS) wit $(JS_BUILD)/pgstream-handler.d.ts
	cmp -s $(JS_BUILD)/pgstream-handler.d.ts $(JS_TYPES) \
		|| { echo "$(JS_TYPES) is stale: run 'make js-types'" >&2; exit 1; }
	touch $@

# Regenerates the committed declarations after a WIT change.
js-types: $(NODE_TOOLS_STAMP)
	node mk/js/wit-types.mjs $(NODE_TOOLS) wit $(JS_TYPES)

# $(call js-component,entry file,tsconfig dir or empty,output name)
define js-component
	mkdir -p $(JS_BUILD) $(WASM_DIR)
	$(if $(2),$(TSC) -p $(2))
	$(ROLLDOWN) $(1) --format esm --platform neutral --external pgstream:handler/host@0.2.0 \
		--file $(JS_BUILD)/$(3).js --log-level warn
	$(COMPONENTIZE_QJS) --sync --wit wit --world handler --js $(JS_BUILD)/$(3).js \
		--output $(WASM_DIR)/$(3).wasm >/dev/null
endef

JS_HELPER := examples/js-handler/pgstream.ts $(JS_TYPES) examples/js-handler/types/globals.d.ts $(JS_BUILD)/types.checked wit/handler.wit $(NODE_TOOLS_STAMP)

$(WASM_DIR)/js-handler.wasm: examples/js-handler/handler.ts examples/js-handler/tsconfig.json $(JS_HELPER)
	$(call js-component,examples/js-handler/handler.ts,examples/js-handler,js-handler)

$(WASM_DIR)/js-error-handler.wasm: tests/plugins/js-error-handler/handler.ts tests/plugins/js-error-handler/tsconfig.json $(JS_HELPER)
	$(call js-component,tests/plugins/js-error-handler/handler.ts,tests/plugins/js-error-handler,js-error-handler)

$(WASM_DIR)/js-noop.wasm: examples/js-noop/handler.js wit/handler.wit $(NODE_TOOLS_STAMP)
	$(call js-component,examples/js-noop/handler.js,,js-noop)

# The helper's unit tests, in Node: bundled with a fake of the host interface.
# Part of `make test` (a prerequisite added to the root Makefile's target).
test: js-test
js-test: $(JS_BUILD)/types.checked
	PGSTREAM_JS_TEST_OUT=$(JS_BUILD)/pgstream.test.mjs $(ROLLDOWN) -c examples/js-handler/test/rolldown.config.mjs --log-level warn
	node --test $(JS_BUILD)/pgstream.test.mjs

# The same no-op built with StarlingMonkey (componentize-js through jco), for the engine
# comparison in docs/handlers/javascript.md: about 45 s and 12 MB. jco's WASI shim has no
# filesystem by default (see mk/js/wit-types.mjs), hence the preload that opens the folders
# it reads and writes. http and fetch-event are disabled: the host grants no wasi:http.
guests-js-starlingmonkey: $(NODE_TOOLS_STAMP)
	mkdir -p $(WASM_DIR)
	cd $(CURDIR) && node --import ./mk/js/jco-preopens.mjs $(JCO) componentize examples/js-noop/handler.js \
		--wit wit --world-name handler --disable http fetch-event --out $(WASM_DIR)/js-noop-starlingmonkey.wasm
