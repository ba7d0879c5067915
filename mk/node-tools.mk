# Node tools shared by the JavaScript and C handlers: jco (component tooling, the WASI
# preview-1 reactor adapter, TypeScript generation), the component builders (componentize-qjs
# for QuickJS, the default; jco's own componentize-js for StarlingMonkey), tsc and rolldown.
# Versions are pinned by mk/node-tools/package-lock.json; `npm ci` installs exactly that into .cache/node-tools, with
# npm's download cache in .cache/npm, so a second install asks no registry.
# Included by the root Makefile, which defines CACHE.

NODE_TOOLS := $(CACHE)/node-tools
NODE_TOOLS_STAMP := $(NODE_TOOLS)/installed.stamp
JCO := $(NODE_TOOLS)/node_modules/.bin/jco
# The adapter that turns a wasm32-wasi (preview 1) reactor module into a preview-2 component.
WASI_REACTOR_ADAPTER := $(NODE_TOOLS)/node_modules/@bytecodealliance/jco/lib/wasi_snapshot_preview1.reactor.wasm

# rolldown and its parser need Node.js 20.19 or later; `npm ci` would only warn.
NODE_VERSION_CHECK := const [a, b] = process.versions.node.split('.').map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)

$(NODE_TOOLS_STAMP): mk/node-tools/package.json mk/node-tools/package-lock.json
	@node -e "$(NODE_VERSION_CHECK)" 2>/dev/null || { \
		echo "error: the JS tools (rolldown, jco) need Node.js 20.19 or later; found" \
			"$$(node --version 2>/dev/null || echo none)" >&2; exit 1; }
	rm -rf $(NODE_TOOLS)
	mkdir -p $(NODE_TOOLS)
	cp mk/node-tools/package.json mk/node-tools/package-lock.json $(NODE_TOOLS)/
	cd $(NODE_TOOLS) && npm ci --cache $(CACHE)/npm --prefer-offline --no-audit --no-fund --loglevel=error
	[[ -x $(JCO) && -f $(WASI_REACTOR_ADAPTER) ]] || { echo "node-tools: jco did not install" >&2; exit 1; }
	touch $@
