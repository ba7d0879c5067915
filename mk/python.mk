# Python handlers: componentize-py (from PyPI) turns a Python module and the WIT world into a
# component that bundles CPython and the module, pre-initialised at build time.
#
# The tool is pinned and installed into its own venv under .cache/; its wheel is kept in
# .cache/wheels, so a rebuilt venv needs no download. Included by the root Makefile, which
# defines CACHE, PYTHON, WASM_DIR, LANG_GUESTS and LANG_TOOL_ENVS.
#
#   guests-python   examples/python-handler -> python-handler.wasm, examples/python-noop ->
#                   python-noop.wasm, tests/plugins/python-error-handler -> python-error-handler.wasm
#   test-python     unit tests of the helper module pgstream.py (native Python, run by make test)

COMPONENTIZE_PY_VERSION := 0.25.1
COMPONENTIZE_PY_VENV := $(CACHE)/venv-componentize-py
COMPONENTIZE_PY := $(COMPONENTIZE_PY_VENV)/bin/componentize-py
COMPONENTIZE_PY_STAMP := $(COMPONENTIZE_PY_VENV)/installed-$(COMPONENTIZE_PY_VERSION).stamp
PYTHON_TOOLS_ENV := $(CACHE)/python-tools.env
# The bindings componentize-py generates for wit/: the unit tests import them natively.
PYTHON_BINDINGS := $(CACHE)/python-bindings
PYTHON_HELPER_DIR := examples/python-handler
PYTHON_WASMS := $(WASM_DIR)/python-handler.wasm $(WASM_DIR)/python-noop.wasm \
	$(WASM_DIR)/python-error-handler.wasm

LANG_GUESTS += guests-python
LANG_TOOL_ENVS += $(PYTHON_TOOLS_ENV)

.PHONY: guests-python test-python
test: test-python

$(COMPONENTIZE_PY_STAMP):
	rm -rf $(COMPONENTIZE_PY_VENV)
	$(call make-venv,$(COMPONENTIZE_PY_VENV))
	ls $(CACHE)/wheels/componentize_py-$(COMPONENTIZE_PY_VERSION)-*.whl >/dev/null 2>&1 || \
		$(COMPONENTIZE_PY_VENV)/bin/pip download --quiet --no-deps --dest $(CACHE)/wheels \
			componentize-py==$(COMPONENTIZE_PY_VERSION)
	$(COMPONENTIZE_PY_VENV)/bin/pip install --quiet --no-deps --no-index \
		--find-links $(CACHE)/wheels componentize-py==$(COMPONENTIZE_PY_VERSION)
	$(COMPONENTIZE_PY) --version | grep -qx 'componentize-py $(COMPONENTIZE_PY_VERSION)'
	touch $@

$(PYTHON_TOOLS_ENV): $(COMPONENTIZE_PY_STAMP)
	echo "export PGSTREAM_COMPONENTIZE_PY=$(COMPONENTIZE_PY)" >$@

guests-python: $(PYTHON_WASMS)

# Each component is rebuilt only when its sources, the helper module or the WIT change: a
# build takes ~15 s of CPU (it snapshots an initialised CPython).
$(WASM_DIR)/python-handler.wasm: $(COMPONENTIZE_PY_STAMP) $(wildcard $(PYTHON_HELPER_DIR)/*.py) wit/handler.wit
	@mkdir -p $(WASM_DIR)
	$(COMPONENTIZE_PY) -d wit -w handler componentize -p $(PYTHON_HELPER_DIR) app -o $@.tmp
	mv $@.tmp $@

$(WASM_DIR)/python-noop.wasm: $(COMPONENTIZE_PY_STAMP) examples/python-noop/noop.py wit/handler.wit
	@mkdir -p $(WASM_DIR)
	$(COMPONENTIZE_PY) -d wit -w handler componentize -p examples/python-noop noop -o $@.tmp
	mv $@.tmp $@

$(WASM_DIR)/python-error-handler.wasm: $(COMPONENTIZE_PY_STAMP) \
		tests/plugins/python-error-handler/error_handler.py $(PYTHON_HELPER_DIR)/pgstream.py wit/handler.wit
	@mkdir -p $(WASM_DIR)
	$(COMPONENTIZE_PY) -d wit -w handler componentize -p tests/plugins/python-error-handler \
		-p $(PYTHON_HELPER_DIR) error_handler -o $@.tmp
	mv $@.tmp $@

$(PYTHON_BINDINGS)/stamp: $(COMPONENTIZE_PY_STAMP) wit/handler.wit
	rm -rf $(PYTHON_BINDINGS)
	$(COMPONENTIZE_PY) -d wit -w handler bindings $(PYTHON_BINDINGS)
	touch $@

test-python: $(PYTHON_BINDINGS)/stamp
	PYTHONPATH=$(PYTHON_BINDINGS):$(PYTHON_HELPER_DIR) PYTHONDONTWRITEBYTECODE=1 \
		$(PYTHON) -m unittest discover --start-directory tests/python --top-level-directory tests/python

# The template of `pgstream-host new --lang python` is built from an empty folder, through the
# real command, by tests/scaffold.rs.
