#!/usr/bin/env bash
# The main job on the embedded default, end to end: build the tiny Phi-4 stand-in, quantize it to 4 bits
# with auto-round (W4A16, group 128, symmetric, GPTQ export), start the daemon, stream replies with the CLI
# client, stop the daemon (SIGTERM drain). Run through `make demo`.
# The stand-in is no Phi-4: a 13M-parameter model trained for ~2 minutes on the prose of Python's docstrings
# (edgephi/devmodel.py). Its prompts below come from that domain (a docstring opening; a docstring summary as
# the chat turn), and its replies are sampled at a low temperature with a fixed seed: docstring-like English.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
RUN=$(mktemp -d)
trap 'if [ -n "${PID:-}" ] && kill -0 "$PID" 2>/dev/null; then kill -TERM "$PID"; wait "$PID" || true; fi; rm -rf "$RUN"' EXIT

echo "== 1/4 tiny Phi-4 stand-in + auto-round W4A16 artifact (cached in .cache/ after the first run)"
MODEL=$($BIN/edgephi devmodel --cache-dir .cache | tail -n 1)
echo "artifact: $MODEL"
echo "stand-in: $($BIN/python -m edgephi.devmodel --describe "$MODEL")"

echo "== 2/4 starting the daemon (vLLM engine, gRPC on 127.0.0.1)"
EDGEPHI_MODEL="$MODEL" EDGEPHI_PORT=0 EDGEPHI_PORT_FILE="$RUN/ports.json" EDGEPHI_MAX_MODEL_LEN=2048 \
  EDGEPHI_KV_CACHE_SPACE_GIB=1 EDGEPHI_ENFORCE_EAGER=true EDGEPHI_SERVED_MODEL_NAME="$(basename "$MODEL")" \
  $BIN/edgephi serve >"$RUN/daemon.log" 2>&1 &
PID=$!
for _ in $(seq 600); do [ -s "$RUN/ports.json" ] && break; kill -0 $PID || { cat "$RUN/daemon.log"; exit 1; }; sleep 0.1; done
PORT=$($BIN/python -c "import json,sys; print(json.load(open(sys.argv[1]))['grpc'])" "$RUN/ports.json")
until $BIN/edgephi health --port "$PORT" >/dev/null 2>&1; do
  kill -0 $PID 2>/dev/null || { tail -n 40 "$RUN/daemon.log"; exit 1; }
  sleep 1
done
echo "health: $($BIN/edgephi health --port "$PORT")"
$BIN/edgephi info --port "$PORT"

SAMPLING=(--temperature 0.6 --top-k 30 --seed 2)
echo "== 3/4 streaming replies (${SAMPLING[*]})"
echo "-- generate: Return the number of"
$BIN/edgephi generate --port "$PORT" --max-tokens 48 "${SAMPLING[@]}" 'Return the number of'
echo "-- chat: Return the absolute value of a number."
$BIN/edgephi chat --port "$PORT" --max-tokens 64 "${SAMPLING[@]}" -m "Return the absolute value of a number."

echo "== 4/4 stopping the daemon (SIGTERM: drain, engine shutdown, exit 0)"
kill -TERM $PID
wait $PID && echo "daemon exited 0"
PID=
