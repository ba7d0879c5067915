# Guest components (wasm32-wasip2): the examples and the test plugins.
#
# Each guest is its own cargo workspace (not a member of the host workspace, which builds for
# the host target); they share one target directory so wit-bindgen and the SDK compile once.
# Outputs are copied to $(GUEST_WASM_DIR)/<name>.wasm, where the host tests look for them.
# Include this file from the root Makefile: `include mk/guests.mk`.

GUEST_TARGET ?= wasm32-wasip2
GUEST_CARGO_TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/guests
GUEST_WASM_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/wasm
GUEST_EXAMPLES := embed-handler noop-handler
GUEST_TEST_PLUGINS := echo-handler trap-handler loop-handler memory-hog error-handler sandbox-probe \
	careless-handler trespass-handler hostile-handler poison-handler
GUEST_DIRS := $(addprefix examples/,$(GUEST_EXAMPLES)) $(addprefix tests/plugins/,$(GUEST_TEST_PLUGINS))

.PHONY: guests
guests:
	@mkdir -p $(GUEST_WASM_DIR)
	@set -e; for dir in $(GUEST_DIRS); do \
		name=$$(basename $$dir); \
		echo "building guest $$name"; \
		CARGO_TARGET_DIR=$(GUEST_CARGO_TARGET_DIR) cargo build --quiet --release \
			--target $(GUEST_TARGET) --manifest-path $$dir/Cargo.toml; \
		cp $(GUEST_CARGO_TARGET_DIR)/$(GUEST_TARGET)/release/$$(echo $$name | tr - _).wasm \
			$(GUEST_WASM_DIR)/$$name.wasm; \
	done
	@# Two versions of one handler, told apart by a tag in their payloads (hot-reload tests).
	@set -e; for tag in v1 v2; do \
		echo "building guest tagged-handler-$$tag"; \
		PGSTREAM_HANDLER_TAG=$$tag CARGO_TARGET_DIR=$(GUEST_CARGO_TARGET_DIR) cargo build --quiet \
			--release --target $(GUEST_TARGET) --manifest-path tests/plugins/tagged-handler/Cargo.toml; \
		cp $(GUEST_CARGO_TARGET_DIR)/$(GUEST_TARGET)/release/tagged_handler.wasm \
			$(GUEST_WASM_DIR)/tagged-handler-$$tag.wasm; \
	done
