#!/usr/bin/env bash
# The whole product on the embedded model, as `make demo` runs it:
#   train two demo tasks -> serve them behind the router -> query every task through the
#   openai client -> train and publish a third task while serving (hot-add) -> query it.
# Everything lands in runs/demo (started clean each time). PORT=8000 by default.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
OUT=runs/demo
REGISTRY=$OUT/registry
PORT=${PORT:-8000}
URL=http://127.0.0.1:$PORT
SPEC=train/demo/tasks.yaml

rm -rf "$OUT"
mkdir -p "$OUT"
echo "== 1/5 training ticket and isodate (zero-shot eval, LoRA, eval, publish)"
$BIN/mtft-train adapters --config $SPEC --task ticket --task isodate --registry $REGISTRY --output $OUT/train

echo "== 2/5 starting mtft-serve (vLLM + router) on $URL"
$BIN/mtft-serve --registry $REGISTRY --port "$PORT" --state-dir $OUT/serve > $OUT/serve.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "$URL/ready" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -30 $OUT/serve.log; echo "mtft-serve died"; exit 1; }
  sleep 1
done
curl -sf "$URL/ready" > /dev/null || { tail -30 $OUT/serve.log; echo "mtft-serve not ready after 300 s"; exit 1; }

echo "== 3/5 asking every served task through the openai client"
$BIN/python -m mtft.serve.demo --url "$URL" --registry $REGISTRY --data train/demo/data

echo "== 4/5 training contact while serving; publishing it hot-adds it (1 training thread beside vLLM)"
$BIN/mtft-train adapters --config $SPEC --task contact --registry $REGISTRY --output $OUT/train --resume --threads 1

echo "== 5/5 the hot-added task answers without a restart"
$BIN/python -m mtft.serve.demo --url "$URL" --registry $REGISTRY --data train/demo/data --wait-for contact
echo
$BIN/mtft-train registry list --registry $REGISTRY
