#!/usr/bin/env bash
# The `make run` demo: the mock LLM, the rate-limit service (memory, or Redis with STORE=redis)
# and a real Envoy with the plugin, on loopback. Prints what runs where and curl commands to
# try; Ctrl-C stops every process it started.
#
# Ports: ENVOY_PORT (10000), ADMIN_PORT (9901), SERVICE_PORT (8080), LLM_PORT (8081),
# REDIS_PORT (6380). ADMIN_TOKEN: the console's admin token. Binaries: ENVOY_BIN, PLUGIN_WASM, RATELIMIT_SERVICE_BIN, MOCK_LLM_BIN (the
# Makefile sets them after building).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STORE=${STORE:-memory}
ENVOY_PORT=${ENVOY_PORT:-10000}
ADMIN_PORT=${ADMIN_PORT:-9901}
SERVICE_PORT=${SERVICE_PORT:-8080}
LLM_PORT=${LLM_PORT:-8081}
REDIS_PORT=${REDIS_PORT:-6380}
ENVOY_BIN=${ENVOY_BIN:-$ROOT/.deps/python/envoy/_bin/envoy}
PLUGIN_WASM=${PLUGIN_WASM:-$ROOT/target/plugin/llm_token_ratelimit.wasm}
RATELIMIT_SERVICE_BIN=${RATELIMIT_SERVICE_BIN:-$ROOT/target/release/ratelimit-service}
MOCK_LLM_BIN=${MOCK_LLM_BIN:-$ROOT/target/release/mock-llm}

for f in "$ENVOY_BIN" "$PLUGIN_WASM" "$RATELIMIT_SERVICE_BIN" "$MOCK_LLM_BIN"; do
  [ -e "$f" ] || { echo "missing $f: run \`make build\` first (or \`make run\`)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/llm-token-ratelimit-demo.XXXXXX")
PIDS=()
stop() {
  trap - EXIT INT TERM
  echo
  echo "stopping: ${PIDS[*]}"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop EXIT
trap 'exit 130' INT TERM

wait_for() { # name url
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not become ready at $2; its log:" >&2
  cat "$WORK/$1.log" >&2 || true
  exit 1
}

"$MOCK_LLM_BIN" --listen "127.0.0.1:$LLM_PORT" 2>"$WORK/mock-llm.log" &
PIDS+=($!)

# The console's admin actions (grant, reset) take this token; the demo's own, for loopback only.
ADMIN_TOKEN=${ADMIN_TOKEN:-demo-admin-token-loopback-only}
SERVICE_ARGS=(--listen "127.0.0.1:$SERVICE_PORT" --admin-token "$ADMIN_TOKEN")
if [ "$STORE" = redis ]; then
  command -v redis-server >/dev/null || { echo "STORE=redis needs redis-server (make deps installs it)" >&2; exit 1; }
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  SERVICE_ARGS+=(--store redis --redis-url "redis://127.0.0.1:$REDIS_PORT")
elif [ "$STORE" != memory ]; then
  echo "STORE must be memory or redis, not $STORE" >&2; exit 1
fi
"$RATELIMIT_SERVICE_BIN" "${SERVICE_ARGS[@]}" 2>"$WORK/service.log" &
PIDS+=($!)

sed -e "s|@ENVOY_PORT@|$ENVOY_PORT|g" -e "s|@ADMIN_PORT@|$ADMIN_PORT|g" \
    -e "s|@SERVICE_PORT@|$SERVICE_PORT|g" -e "s|@LLM_PORT@|$LLM_PORT|g" \
    -e "s|@PLUGIN_WASM@|$PLUGIN_WASM|g" "$ROOT/deploy/envoy/demo.yaml" >"$WORK/envoy.yaml"
"$ENVOY_BIN" -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn \
  --component-log-level wasm:info 2>"$WORK/envoy.log" &
PIDS+=($!)

wait_for mock-llm "http://127.0.0.1:$LLM_PORT/healthz"
wait_for service "http://127.0.0.1:$SERVICE_PORT/readyz"
wait_for envoy "http://127.0.0.1:$ADMIN_PORT/ready"

E="http://127.0.0.1:$ENVOY_PORT"
ASK="-H 'content-type: application/json' -d '{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"
cat <<INFO

llm-token-ratelimit demo (store: $STORE)
  Envoy + plugin   $E        (admin http://127.0.0.1:$ADMIN_PORT, plugin metrics: /stats?filter=llm_token_ratelimit)
  rate-limit svc   http://127.0.0.1:$SERVICE_PORT  (/v1/quota, /metrics)
  console          http://127.0.0.1:$SERVICE_PORT/console  (admin token for grant / reset: $ADMIN_TOKEN)
  mock LLM         http://127.0.0.1:$LLM_PORT  (OpenAI, Anthropic, Gemini, DashScope shapes)
  logs             $WORK

Budget: 100 tokens per hour per x-user; each mock answer uses 26 (10 prompt + 16 completion).

# alice spends her budget: 200 200 200 200 then 429
for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code}\\n' $E/v1/chat/completions -H 'x-user: alice' $ASK; sleep 0.2; done

# the 429 (OpenAI error JSON, retry-after) and bob, who is still served, with the quota headers
curl -si $E/v1/chat/completions -H 'x-user: alice' $ASK
curl -si $E/v1/chat/completions -H 'x-user: bob' $ASK | grep -i '^x-ratelimit'

# a streaming request without stream_options: the plugin asks for usage, and carol is charged
curl -sN $E/v1/chat/completions -H 'x-user: carol' -H 'content-type: application/json' -d '{"model": "demo", "stream": true, "messages": []}'
curl -s 'http://127.0.0.1:$SERVICE_PORT/v1/quota?limit=per-user&value=carol'

# other providers' shapes: Anthropic streaming, Gemini
curl -sN $E/v1/messages -H 'x-user: dave' -H 'content-type: application/json' -d '{"model": "claude", "stream": true}'
curl -s $E/v1beta/models/gemini:generateContent -H 'x-user: dave' -H 'content-type: application/json' -d '{}'

Ctrl-C stops everything.
ready
INFO

# Run until interrupted, or until one of the processes dies.
while true; do
  for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "process $pid exited; logs in $WORK:" >&2
      tail -n 20 "$WORK"/*.log >&2 || true
      exit 1
    fi
  done
  sleep 1
done
