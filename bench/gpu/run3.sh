#!/usr/bin/env bash
# GPU run 3 of 3 (about 4 minutes of command time; give the device tool timeout_s=300): the
# product's benchmarks on the GPU, what issues #13, #14 and #15 ask for, issued while the machine
# is still warm (a fresh machine builds first):
#   - the model, packed and padded, beside HF eager / sdpa in fp16 and bf16: bs32x128 fixed and
#     bs16x512 with lengths 0.2-1.0 x 512 (mean 0.6 x max);
#   - optimize(hf_model) against the same HF model unoptimised, fp16;
#   - the engine end to end (embed and classify in fp16 beside the same HF loop, the fraction of
#     time the GPU waits between batches).
#   Files under $OUT (at most 8): model.csv bench_model.log optimize.csv bench_optimize.log
#   engine.csv bench_engine.log summary.txt (+ build.log on a fresh machine)
# If the device time left allows only one more run after run 1, prefer this one to run 2.
source "$(dirname "$0")/common.sh"

if ! "$PY" -c "import distilbert_fast" 2>/dev/null; then
  if ! run_step build "$OUT/build.log" 150 90 build_package; then
    finish; echo "build failed: see $OUT/build.log"; exit 1
  fi
fi

if [[ $DRY_RUN == 1 ]]; then
  model_args=(--quick --device cpu --backends cpu --shapes 1x8 --varlen none --ragged 2x4-8)
  dtypes=(float32)
  optimize_args=(--quick --gemm-floor)
  engine_args=(--quick --texts 12 --no-pipeline --no-record --classify)
else
  model_args=(--device cuda --shapes 32x128 --varlen 16x512 --ragged none)
  dtypes=(float16 bfloat16)
  optimize_args=(--device cuda --gemm-floor --output "$OUT/optimize.csv")
  engine_args=(--device cuda --texts 4000 --repeats 3 --no-pipeline --budgets "" --lengths "" --output "$OUT/engine.csv")
fi
model_rc=0
for dtype in "${dtypes[@]}"; do
  run_step "bench_model_$dtype" "$OUT/bench_model.log" 60 120 \
    "$PY" bench/bench_model.py --dtype "$dtype" --output "$OUT/model.csv" "${model_args[@]}" || model_rc=1
done
run_step bench_optimize "$OUT/bench_optimize.log" 50 70 "$PY" bench/bench_optimize.py "${optimize_args[@]}"
optimize_rc=$?
run_step bench_engine "$OUT/bench_engine.log" 70 0 "$PY" bench/bench_engine.py "${engine_args[@]}"
engine_rc=$?

finish || exit 1
exit $(( model_rc != 0 || optimize_rc != 0 || engine_rc != 0 ))
