#!/usr/bin/env bash
# One device call: install carried wheels, then run the benchmark steps named as arguments.
# Usage (on the device): bash benchmarks/device_run.sh gpt2-variants smollm2 ...
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
for step in "$@"; do
  echo "=== $step"
  {
  case "$step" in
    gpt2)  timeout 120 python3 benchmarks/gpt2_speed.py --runs 15 --out "$OUT/results.md" ;;
    gpt2-ref) GPTJAX_KERNELS=ref timeout 120 python3 benchmarks/gpt2_speed.py --runs 10 | grep -E "tg128|pp512" ;;
    gpt2-variants)
      for u in 1 4 32; do
        echo "--- GPTJAX_DECODE_UNROLL=$u"
        GPTJAX_DECODE_UNROLL=$u python3 benchmarks/gpt2_speed.py --runs 10 --prefill 64 | grep -E "tg128|pp512"
      done
      echo "--- command buffers incl. WHILE/CONDITIONAL"
      XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
        python3 benchmarks/gpt2_speed.py --runs 10 --prefill 64 | grep -E "tg128|pp512" ;;
    smollm2) python3 benchmarks/decode_speed.py --synthetic smollm2 --batches 1,32 --out "$OUT/results.md" ;;
    gpt-oss) timeout 240 python3 benchmarks/decode_speed.py --synthetic gpt-oss-20b --batches 1 --modes packed --runs 5 \
               --prompt-len 1 --new 64 --no-prefill --out "$OUT/results.md" ;;
    kernel-tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_e2e.py \
               tests/test_attention_kernels.py tests/test_matmul_kernels.py 2>&1 | tail -25 ;;
    breakdown)
      timeout 150 python3 benchmarks/decode_breakdown.py --model gpt2-124m --dump /tmp/hlo_gpt2
      timeout 300 python3 benchmarks/decode_breakdown.py --model gpt-oss-20b --context 4096 --runs 10 ;;
    kernels-bench)
      timeout 300 python3 benchmarks/attention_kernels.py --out "$OUT/results.md"
      timeout 300 python3 benchmarks/matmul_kernels.py --quick --out "$OUT/results.md" ;;
    profile)
      timeout 240 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --new 32 --top 40 --hlo-dump /tmp/hlo_oss
      timeout 120 python3 benchmarks/profile_decode.py --gpt2 --new 64 --top 30 --hlo-dump /tmp/hlo_gpt2 ;;
    profile-ref)
      GPTJAX_KERNELS=ref timeout 240 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --new 32 --top 25 ;;
    matmul-bench) timeout 300 python3 benchmarks/matmul_kernels.py --runs 5 --out "$OUT/results.md" ;;
    targets) timeout 420 python3 benchmarks/gpt_oss_targets.py --out "$OUT/results.md" ;;
    targets-grouped) GPTJAX_MOE_KERNEL_MAX_ROWS=100000 timeout 300 python3 benchmarks/gpt_oss_targets.py \
               --skip b1,long,memory --out "$OUT/results.md" ;;
    long-grouped) GPTJAX_MOE_KERNEL_MAX_ROWS=100000 timeout 240 python3 benchmarks/gpt_oss_targets.py \
               --skip b1,pp512,b64,memory --out "$OUT/results.md" ;;
    targets-ref) GPTJAX_KERNELS=ref timeout 400 python3 benchmarks/gpt_oss_targets.py --skip b64,memory --runs 3 \
               --out "$OUT/results.md" ;;
    sweep) timeout 400 python3 benchmarks/tile_sweep.py ;;
    fused-tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused_gemv.py \
               tests/test_kernels_e2e.py tests/test_attention_kernels.py 2>&1 | tail -25 ;;
    fused-sweep) timeout 300 python3 benchmarks/fused_sweep.py ;;
    fused-oss) timeout 400 python3 benchmarks/fused_sweep.py --oss --copies 4 ;;
    e2e-tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_e2e.py \
               tests/test_moe_decode.py 2>&1 | tail -6 ;;
    attn-tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_kernels.py \
               tests/test_kernels_e2e.py 2>&1 | tail -8 ;;
    loop-forms) timeout 500 python3 benchmarks/loop_forms.py --runs 5 ;;
    first-token) timeout 500 python3 benchmarks/first_token.py --runs 5 ;;
    targets-b1-unroll2) GPTJAX_DECODE_UNROLL=2 timeout 400 python3 benchmarks/gpt_oss_targets.py --skip pp512,b64,memory,long --out "$OUT/results.md" ;;
    targets-b64) timeout 400 python3 benchmarks/gpt_oss_targets.py --skip b1,long,memory --out "$OUT/results.md" ;;
    targets-b1) timeout 400 python3 benchmarks/gpt_oss_targets.py --skip pp512,b64,memory --out "$OUT/results.md" ;;
    profile-oss) timeout 240 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --new 32 --top 12 --hlo-dump /tmp/hlo_oss --sequence 40 ;;
    profile-oss-long) timeout 300 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --prompt-len 4096 --new 32 --top 12 --hlo-dump /tmp/hlo_long --sequence 40 ;;
    profile-gaps)
      timeout 200 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --prompt-len 4096 --new 64 --top 3 --module "" --gaps 12
      timeout 200 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --prompt-len 16 --new 128 --top 3 --module "" --gaps 12 ;;
    profile-gaps-b64) timeout 300 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --batch 64 --prompt-len 16 --new 64 --top 30 --module "" --gaps 16 --sequence 60 ;;
    profile-b64-hlo) timeout 300 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --batch 64 --prompt-len 16 --new 32 --top 70 --hlo-dump /tmp/hlo_b64 --sequence 80 ;;
    profile-oss-b64) timeout 300 python3 benchmarks/profile_decode.py --synthetic gpt-oss-20b --batch 64 --new 16 --top 45 ;;
    moe-tests) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_decode.py \
               tests/test_matmul_kernels.py tests/test_fused_gemv.py tests/test_kernels_e2e.py 2>&1 | tail -25 ;;
    moe-sweep) timeout 500 python3 benchmarks/moe_decode_sweep.py ;;
    moe-tiles) timeout 500 python3 benchmarks/moe_decode_sweep.py --set tiles ;;
    moe-flat-tiles) timeout 500 python3 benchmarks/moe_decode_sweep.py --set flat-tiles ;;
    moe-warps) timeout 300 python3 benchmarks/moe_decode_sweep.py --set warps ;;
    moe-ceiling) timeout 400 python3 benchmarks/moe_read_ceiling.py ;;
    moe-b1-dot) timeout 500 python3 benchmarks/moe_b1_dot.py ;;
    attn-sweep) timeout 300 python3 benchmarks/attention_kernels.py --decode-sweep --runs 10 2>&1 | grep -v "^ok" ;;
    rows-sweep) timeout 300 python3 benchmarks/dense_rows_sweep.py --head ;;
    rows-sweep-cold) timeout 400 python3 benchmarks/dense_rows_sweep.py --copies 4 --wide ;;
    q8-tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matmul_kernels.py -k "q8" 2>&1 | tail -8 ;;
    rows-big) timeout 400 python3 benchmarks/dense_rows_sweep.py --copies 4 --big --head ;;
    rows-asm) timeout 300 python3 benchmarks/dense_rows_sweep.py --copies 4 --asm --head ;;
    final-15)
      timeout 380 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matmul_kernels.py \
               tests/test_attention_kernels.py tests/test_quant_linear.py tests/test_fused_gemv.py \
               tests/test_moe_decode.py tests/test_moe_route.py tests/test_kernels_e2e.py 2>&1 | tail -6
      timeout 200 python3 benchmarks/gpt_oss_targets.py --out "$OUT/results.md" ;;
    gemv-head) timeout 400 python3 benchmarks/dense_rows_sweep.py --gemv-head ;;
    rows-xla) timeout 300 python3 benchmarks/dense_rows_sweep.py --copies 4 --xla --head --rows 1,64 ;;
    rows-swap) timeout 500 python3 benchmarks/dense_rows_sweep.py --copies 4 --swap --head --rows 16,32 ;;
    rows-swap8) timeout 400 python3 benchmarks/dense_rows_sweep.py --copies 4 --swap8 --head --rows 64 ;;
    q8-ablation) timeout 400 python3 benchmarks/q8_rows_ablation.py --copies 4 ;;
    q8-swap) timeout 500 python3 benchmarks/q8_rows_ablation.py --copies 4 --swap-only ;;
    swap-tests) timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matmul_kernels.py tests/test_kernels_e2e.py 2>&1 | tail -6 ;;
    qkv-partials-ab)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_kernels.py tests/test_quant_linear.py \
               tests/test_kernels_e2e.py 2>&1 | tail -6
      for v in 1 0 1; do echo "--- GPTJAX_QKV_PARTIALS=$v"; GPTJAX_QKV_PARTIALS=$v timeout 200 python3 benchmarks/gpt_oss_targets.py --skip b1,long,memory,pp512 2>&1 | grep -E "^(b64|pp512|decode|load)" | tail -6; done ;;
    swap-ab)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matmul_kernels.py tests/test_kernels_e2e.py 2>&1 | tail -6
      for v in 1 0 1; do echo "--- GPTJAX_SWAP_DOT=$v"; GPTJAX_SWAP_DOT=$v timeout 200 python3 benchmarks/gpt_oss_targets.py --skip b1,long,memory,pp512 2>&1 | grep -E "^(b64|pp512|decode|load)" | tail -6; done ;;
    attn-dev-sweep) timeout 200 python3 benchmarks/decode_attention_sweep.py ;;
    dot-variants) timeout 300 python3 benchmarks/mxfp4_dot_variants.py ;;
    decode-variants) timeout 400 python3 benchmarks/mxfp4_dot_variants.py --decode-variants ;;
    grouped-stages) timeout 400 python3 benchmarks/mxfp4_dot_variants.py --stages ;;
    scale-ablation) timeout 300 python3 benchmarks/mxfp4_dot_variants.py --scale-ablation ;;
    grouped-asm-tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matmul_kernels.py \
               -k "bf16_dots or moe or identity" 2>&1 | tail -8 ;;
    next-first) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_route.py 2>&1 | tail -3
               timeout 300 python3 benchmarks/gpt_oss_targets.py --skip b1,long,memory --out "$OUT/results.md" ;;
    final-11)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_kernels.py tests/test_kernels_e2e.py 2>&1 | tail -4
      timeout 420 python3 benchmarks/gpt_oss_targets.py --out "$OUT/results.md" ;;
    final-tests) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_route.py tests/test_matmul_kernels.py \
               tests/test_moe_decode.py tests/test_fused_gemv.py tests/test_kernels_e2e.py 2>&1 | tail -8 ;;
    grouped-asm) timeout 400 python3 benchmarks/mxfp4_dot_variants.py --asm ;;
    grouped-sweep) timeout 300 python3 benchmarks/mxfp4_dot_variants.py --grouped-sweep ;;
    words-proto) timeout 400 python3 benchmarks/mxfp4_words_proto.py ;;
    ncu-moe) timeout 500 /usr/local/cuda/bin/ncu --set full -k regex:"mxfp4_moe_grouped|moe_gate_up|moe_down" --launch-skip 4 --launch-count 4 python3 benchmarks/ncu_moe.py 2>&1 | grep -v "^==PROF==" ;;
    ncu-q8) timeout 170 /usr/local/cuda/bin/ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats -k regex:"q8_0_matmul" --launch-skip 2 --launch-count 2 python3 benchmarks/ncu_q8.py 2>&1 | grep -v "^==PROF==" ;;
    ncu-grouped) timeout 300 /usr/local/cuda/bin/ncu --section WarpStateStats --section InstructionStats --print-details all -k regex:"mxfp4_moe_grouped" --launch-skip 4 --launch-count 1 python3 benchmarks/ncu_moe.py 2>&1 | grep -v "^==PROF==" ;;
    profile-gpt2) timeout 120 python3 benchmarks/profile_decode.py --gpt2 --new 64 --top 30 --hlo-dump /tmp/hlo_gpt2 ;;
    pdl-probe)
      python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
      for f in "" "--xla_gpu_enable_pdl=false" "--xla_gpu_enable_pdl=true" "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"; do
        rm -rf /tmp/pd; XLA_FLAGS="$f --xla_dump_to=/tmp/pd" timeout 120 python3 benchmarks/pdl_probe.py /tmp/pd 2>&1 | tail -4
      done
      for f in "--xla_gpu_enable_pdl=false" "--xla_gpu_enable_pdl=true" "--xla_gpu_enable_pdl=false"; do
        echo "--- b1 XLA_FLAGS=$f"
        XLA_FLAGS="$f" timeout 150 python3 benchmarks/gpt_oss_targets.py --skip long,pp512,b64,memory 2>&1 | grep -i "tok/s\|b1\|error" | head -8
      done
      for f in "--xla_gpu_enable_pdl=true" "--xla_gpu_enable_pdl=false"; do
        echo "--- b64 XLA_FLAGS=$f"
        XLA_FLAGS="$f" timeout 150 python3 benchmarks/gpt_oss_targets.py --skip b1,long,pp512,memory 2>&1 | grep -i "tok/s\|b64\|error" | head -8
      done ;;
    router-b64) timeout 200 python3 benchmarks/router_b64.py --rows 64,512 ;;
    router-final)
      timeout 200 python3 benchmarks/router_b64.py --rows 64,512
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused_gemv.py tests/test_kernels_e2e.py \
               tests/test_moe_route.py 2>&1 | tail -4
      for r in 64 0; do
        echo "--- b64 GPTJAX_FUSED_ROUTER_ROWS=$r"
        GPTJAX_FUSED_ROUTER_ROWS=$r timeout 140 python3 benchmarks/gpt_oss_targets.py --skip b1,long,pp512,memory 2>&1 | grep -i "tok/s\|error" | head -4
      done ;;
    router-sweep) timeout 200 python3 benchmarks/router_b64.py --rows 64 --sweep ;;
    route-warps) timeout 200 python3 benchmarks/router_b64.py --route-warps 4,8,16,32 ;;
    gpu-tests) python3 -m pytest -q -m gpu tests 2>&1 | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
  } 2>&1 | grep -v "DeprecationWarning\|warnings.warn" | tee "$OUT/$step.log" | tail -60
done
