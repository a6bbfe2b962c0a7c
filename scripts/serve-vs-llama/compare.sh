#!/bin/sh
# starlift serve against llama.cpp's llama-server on the same weights (docs/performance/serve.md).
# Per concurrency level C: each starlift variant, then each llama-server variant, one after the
# other, each driven by the same `starlift loadtest` (C closed-loop clients, C warm-up requests,
# max(4C, 8) measured requests or REQUESTS, 128 random prompt ids, 64 streamed tokens). Run it under the lock:
#   flock /tmp/starlift-heavy.lock env VARIANTS="int4=int4|" GGUF=gguf/q4_0.gguf \
#       LLVARIANTS="llama-q4_0=;llama-q4_0-poll0=--poll 0" sh compare.sh
# VARIANTS="label=ARTIFACT|extra serve args;..."  LLVARIANTS="label=extra llama-server args;..."
# S / LS: the starlift and llama-server executables; R: the results folder (label-cC.json each).
set -e
# run from the folder that should receive the results (R, default ./results)
LEVELS=${LEVELS:-"1 4 8 16"}
S=${S:-starlift}
LS=${LS:-llama-server}
PT=${PT:-128}; MT=${MT:-64}
R=${R:-results}; mkdir -p $R
for C in $LEVELS; do
  N=${REQUESTS:-$(( C * 4 > 8 ? C * 4 : 8 ))}
  echo "$VARIANTS" | tr ';' '\n' | while IFS= read -r V; do
    [ -z "$V" ] && continue
    LABEL=${V%%=*}; REST=${V#*=}; ART=${REST%%|*}; ARGS=${REST#*|}
    echo "$(date -u +%H:%M:%S) $LABEL C=$C $(cut -d' ' -f1-3 /proc/loadavg)" >> $R/load.log
    rm -f $R/s.out
    $S serve $ART --port 0 --max-concurrency $C --max-queue 64 --served-model-name m113 $ARGS < /dev/null > $R/s.out 2> $R/s.err &
    SP=$!
    for i in $(seq 240); do grep -q ready $R/s.out 2>/dev/null && break; sleep 0.5; done
    U=$(grep -o 'http://[^ ]*' $R/s.out)
    $S loadtest $U --concurrency $C --requests $N --warmup $C --disconnect-rate 0 --prompt-tokens $PT --max-tokens $MT \
       --vocab 100:49000 --server-pid $SP --label $LABEL --json $R/$LABEL-c$C.json < /dev/null > $R/$LABEL-c$C.txt 2>&1 || true
    kill -TERM $SP; wait $SP || true
  done
  echo "$LLVARIANTS" | tr ';' '\n' | while IFS= read -r LV; do
    [ -z "$LV" ] && continue
    LL=${LV%%=*}; LARGS=${LV#*=}
    echo "$(date -u +%H:%M:%S) $LL C=$C $(cut -d' ' -f1-3 /proc/loadavg)" >> $R/load.log
    PORT=$((20000 + $$ % 10000))
    $LS -m $GGUF --host 127.0.0.1 --port $PORT --parallel $C --cont-batching -c $((C * 256)) -t 2 -tb 2 \
        --metrics --no-webui -a m113 $LARGS < /dev/null > $R/l.out 2>&1 &
    LP=$!
    for i in $(seq 240); do curl -sf http://127.0.0.1:$PORT/health > /dev/null && break; sleep 0.5; done
    $S loadtest http://127.0.0.1:$PORT --concurrency $C --requests $N --warmup $C --disconnect-rate 0 --prompt-tokens $PT \
       --max-tokens $MT --vocab 100:49000 --server-pid $LP --label $LL --json $R/$LL-c$C.json < /dev/null > $R/$LL-c$C.txt 2>&1 || true
    kill -TERM $LP; wait $LP || true
  done
done
