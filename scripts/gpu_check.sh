#!/usr/bin/env bash
# GPU tests and benchmarks in one call, short table last.
#   bash scripts/gpu_check.sh [--quick] [--only NAME ...]
# Steps (NAME): sparse_attn_check serve_check gpu_pytest bench_sparse_attn bench_attention_kl kl_gluon
# kl_dispatch
# bench_sparse_layer bench_decode; opt-in probes, run only when named: sa_probe index_ab kv_variants
# sa_local_check kv_local_ab sa_keys_check kv_bwd_keys sa_kernel_times sa_real_check sa_real_bench sa_pytest
# one_token_probe gather_floor q_outer_tma q_outer_tma_orders q_outer_skip g16_tma_orders kv_ws kv_ws_probe kv_ws_g1 kv_ws_sched kv_bwd_probe sa_auto_host ws_auto_ab sa_optin_check sa_host_overhead reduce_variants main_flags lean_ab bwd_g24 sa_gluon_pytest sa_gluon_check kv_gluon_ab
# kv_overlap_pytest kv_overlap_check kv_overlap_ab gluon_flags_ab gluon_pipe_ab gluon_bwd_ab gluon_g1_sweep kv_split_pytest kv_split_ab locality_pytest locality_auto locality_mid locality_list bench_pooled list_stages_ab locality_threshold tma_threshold thresholds_random random_8k_slim pooled_bwd_kernels small_tiles hybrid_bwd one_token g16_orders
# Logs go to $OUT (the device tool's output folder) or benchmarks/results/logs.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS="${OUT:-benchmarks/results/logs}"
mkdir -p "$LOGS"
QUICK=""
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --only) shift; ONLY+=("$1") ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF' | tee "$LOGS/env.txt"
import torch, triton, datetime
print(f"{datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
PYEOF
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"
step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $name " ]]; then return; fi
  if [ ${#ONLY[@]} -eq 0 ] && [[ " sa_probe index_ab kv_variants sa_local_check kv_local_ab sa_keys_check kv_bwd_keys sa_kernel_times sa_real_check sa_real_bench sa_pytest sa_optin_check sa_host_overhead reduce_variants main_flags lean_ab bwd_g24 sa_gluon_pytest sa_gluon_check kv_gluon_ab kv_overlap_pytest kv_overlap_check kv_overlap_ab gluon_flags_ab gluon_pipe_ab gluon_bwd_ab gluon_g1_sweep kv_split_pytest kv_split_ab locality_pytest locality_auto locality_mid locality_list bench_pooled list_stages_ab locality_threshold tma_threshold thresholds_random random_8k_slim pooled_bwd_kernels small_tiles hybrid_bwd one_token g16_orders one_token_probe gather_floor q_outer_tma q_outer_tma_orders q_outer_skip g16_tma_orders kv_ws kv_ws_probe kv_ws_g1 kv_ws_sched kv_bwd_probe sa_auto_host ws_auto_ab " =~ " $name " ]]; then return; fi
  local start=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  printf "%-24s rc=%-3s %4ss  %s\n" "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -n 1 "$LOGS/$name.log" | cut -c1-90)" >> "$SUMMARY"
}
# quick mode: smaller sweeps (each script's own flags)
if [ -n "$QUICK" ]; then
  KL_ARGS=(--sizes 4096,16384); LAYER_ARGS=(--seqlens 16384,65536 --groups 4); SA_ARGS=(--quick); DEC_ARGS=(--quick)
else
  KL_ARGS=(--extras); LAYER_ARGS=(--check); SA_ARGS=(); DEC_ARGS=()
fi
step sparse_attn_check 300 "$PY" scripts/gpu_sparse_attention.py $QUICK
step serve_check 300 "$PY" scripts/gpu_serve.py
# GPU-only pytest cases (bf16 kernels, CUDA paths); CPU interpreter cases are CI's
step gpu_pytest 600 env SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_attention_kl.py tests/ops/test_kl_gluon.py tests/ops/test_launch.py tests/ops/test_sparse_attn_triton.py -k gpu
# the sparse-attention GPU pytest cases alone (bf16, every loop order), without the StreamKL ones
step sa_pytest 170 env SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_sparse_attn_triton.py -k gpu
step bench_sparse_attn 600 "$PY" benchmarks/sparse_attention.py "${SA_ARGS[@]}" --out "$LOGS/bench_sparse_attn.json"
step bench_attention_kl 600 "$PY" benchmarks/attention_kl.py --out "$LOGS" "${KL_ARGS[@]}"
# the Gluon StreamKL forward (default on Hopper from gluon_fwd.GLUON_MIN_KEYS keys): its checks and config A/B,
# then the API forward with each config and the automatic choice at every size
step kl_gluon 540 env SPARSA_POISON_OUTPUTS=1 "$PY" scripts/kl_gluon_check.py --sizes 2048,8192,32768,65536 --config-timeout 120
step kl_dispatch 560 "$PY" scripts/kl_dispatch_sweep.py --out "$LOGS"
step bench_sparse_layer 600 "$PY" benchmarks/sparse_layer.py "${LAYER_ARGS[@]}"
step bench_decode 600 "$PY" benchmarks/decode.py "${DEC_ARGS[@]}"
step sa_probe 300 "$PY" scripts/sparse_attn_probe.py ${SA_PROBE_ARGS:-}
step index_ab 300 "$PY" scripts/index_ab.py --sizes 8192,65536 --groups 1,4,8
step kv_variants 400 "$PY" scripts/kv_variants.py
# the opt-in KV-outer forward with the local blocks in the merge kernel (SPARSA_KV_LOCAL=1): bf16 checks,
# then its A/B against the default; GPU time per kernel with either pair index
step sa_local_check 300 env SPARSA_KV_LOCAL=1 "$PY" scripts/gpu_sparse_attention.py --quick
step kv_local_ab 300 "$PY" scripts/kv_local_ab.py --sizes 8192,65536 --groups 1,4,8 --local "64x4;128x8" --backward
# the opt-in dK/dV kernel with the keys as MMA rows (SPARSA_KV_BWD_KEYS=1): bf16 checks, then launch variants
step sa_keys_check 300 env SPARSA_KV_BWD_KEYS=1 "$PY" scripts/gpu_sparse_attention.py --quick
step kv_bwd_keys 400 "$PY" scripts/kv_variants.py --sizes 8192,65536 --groups 1,4,8 --fwd none --bwd "k;k128x8;k64x4"
# both opt-ins at once, bf16 checks only (one call instead of sa_local_check + sa_keys_check)
step sa_optin_check 300 env SPARSA_KV_LOCAL=1 SPARSA_KV_BWD_KEYS=1 "$PY" scripts/gpu_sparse_attention.py --quick
# the kernels on SmolLM2's real queries and keys with select_blocks selections; make the file here (CPU, about
# 2 min) and carry it: python3 scripts/real_activations.py --tokens 4096 --out .carry/smollm2_qk.safetensors
step sa_real_check 300 "$PY" scripts/gpu_sparse_attention.py --quick --activations "${SA_ACTIVATIONS:-.carry/smollm2_qk.safetensors}"
step sa_real_bench 300 "$PY" scripts/real_selection_bench.py "${SA_ACTIVATIONS:-.carry/smollm2_qk.safetensors}"
# the per-token reductions (forward merge, dQ sum): rows x slots per step against the default (8 x 16)
step reduce_variants 300 "$PY" scripts/kv_variants.py --sizes 8192,65536 --groups 1,4,16 --fwd none --bwd none --reduce "32x1;8x8;16x16"
# this tree's MAIN and dK/dV kernels against a baseline's (.ab_old, see scripts/kernel_ab.py; carry it)
step lean_ab 300 "$PY" scripts/kernel_ab.py --old-dir .ab_old --shapes "65536,4;8192,4;65536,1;8192,1;65536,16;8192,16"
# dK/dV launches at G = 2, 4 with the lean body where session 13 did not measure them (16K, 32K)
step bwd_g24 300 "$PY" scripts/kv_variants.py --sizes 16384,32768 --groups 2,4 --fwd none --bwd "64x4x0x1;32x4x0x1;64x4x0x2;64x8x0x1"
# kv_outer's boolean experiments (MAIN_EARLY_V, CACHE_HINTS) against the defaults
step main_flags 300 "$PY" scripts/kv_variants.py --sizes 8192,65536 --groups 1,4,16 --fwd none --bwd none --flags "MAIN_EARLY_V;CACHE_HINTS;MAIN_EARLY_V+CACHE_HINTS"
# the Gluon MAIN forced on at every G (SPARSA_KV_GLUON=1, Hopper): the bf16 GPU tests and checks with it, then against the Triton MAIN
step sa_gluon_pytest 170 env SPARSA_KV_GLUON=1 SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_sparse_attn_triton.py -k gpu
step sa_gluon_check 300 env SPARSA_KV_GLUON=1 "$PY" scripts/gpu_sparse_attention.py --quick
step kv_gluon_ab 400 "$PY" scripts/kv_gluon_ab.py --sizes 8192,65536 --groups 1,4,16 --programs "2;1"
# SPARSA_KV_OVERLAP=1 (overlap.py: a head chunk's reduction on a side stream next to the next chunk's block
# kernel): its tests and the bf16 checks with it on, then against the default
step kv_overlap_pytest 200 env SPARSA_KV_OVERLAP=1 SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_kv_overlap.py tests/ops/test_sparse_attn_triton.py -k "gpu or overlap or head_range or head_chunks"
step kv_overlap_check 300 env SPARSA_KV_OVERLAP=1 "$PY" scripts/gpu_sparse_attention.py --quick
step kv_overlap_ab 400 "$PY" scripts/kv_overlap_ab.py --sizes 8192,65536 --groups 1,4,8 --chunks "8;4;2"
# the Gluon MAIN's session-15 variants (TMA partial stores, 32-bit gather offsets): GPU tests, then against the
# Triton MAIN and the Gluon base version
step gluon_flags_ab 480 bash -c "$PY -m pytest -q tests/ops/test_kv_gluon.py -k gpu && $PY scripts/kv_gluon_ab.py --sizes 8192,65536 --groups 1,4,16 --programs 2 --flags 'none;TMA_STORE;OFFSETS_I32;TMA_STORE+OFFSETS_I32'"
# the PIPELINE variant (stores of item i under item i + 1's first MMA) against the best of the above, every KV-outer G
step gluon_pipe_ab 480 bash -c "$PY -m pytest -q tests/ops/test_kv_gluon.py -k gpu && $PY scripts/kv_gluon_ab.py --sizes 8192,16384,65536 --groups 1,2,4,8 --programs 2 --flags 'TMA_STORE+OFFSETS_I32;TMA_STORE+OFFSETS_I32+PIPELINE'"
# the Gluon dK/dV (kv_gluon_bwd.py, SPARSA_KV_GLUON_BWD=1): its GPU tests, then against the Triton dK/dV
step gluon_bwd_ab 480 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_kv_gluon_bwd.py -k gpu; $PY scripts/kv_gluon_bwd_ab.py --sizes ${BWD_AB_SIZES:-8192,65536} --groups ${BWD_AB_GROUPS:-1,4,8,16}"
# G = 1 on the Gluon MAIN (forced on; without PIPELINE) against the Triton MAIN at every N of the benchmark
step gluon_g1_sweep 400 "$PY" scripts/kv_gluon_ab.py --sizes 8192,16384,32768,65536,131072 --groups 1 --programs 2
# the local blocks in their own kernel (kv_local.py, SPARSA_KV_LOCAL_SPLIT=1; session 18, not yet timed): its tests on
# the GPU, then bf16 accuracy at 4K and the forward A/B (launch variants, kernel times, forward+backward with WITH_GRAD)
step kv_split_pytest 200 env SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_kv_local.py
step kv_split_ab 540 "$PY" scripts/kv_local_split_ab.py --sizes 8192,65536 --groups 4,1,16,2,8 --rows 64x8,128x8,64x4 --accuracy --profile --backward
# selections with locality (session 19): the locality check and q_tile tests on the GPU (fp32 inputs, not the
# interpreter), then the automatic order with / without the check and every order on pooled and random selections
step locality_pytest 200 env SPARSA_POISON_OUTPUTS=1 "$PY" -m pytest -q tests/ops/test_sparse_attn_triton.py -k "takes_q_tile or waste or monitor or q_tile_forward or gpu"
step locality_auto 300 "$PY" scripts/locality_bench.py --ns 8192,65536 --gs 4,16,1 --pools 20,0 --auto-only
# the automatic order (check on by default since session 20) at the sizes between: 16K and 32K
step locality_mid 300 "$PY" scripts/locality_bench.py --ns 16384,32768 --gs 4,16,1 --pools 20,0 --auto-only
# the benchmark on pooled selections (P = 20: real selections' tile unions), every G; POOL_NS picks the sizes
step bench_pooled 560 "$PY" benchmarks/sparse_attention.py --pool 20 --ns "${POOL_NS:-16384,32768}" --out "$LOGS/bench_pooled.json"
# the union-list q_tile forward with two pipeline stages (82 KB of shared memory: two programs per SM) against
# three (115 KB, the default at block 64, head dim 128: one per SM), 128 x 8 with two, and K / V by TMA
# (SPARSA_Q_TILE_TMA=1) at two and three stages; pooled selections. First the q_tile tests with TMA on.
step list_stages_ab 480 bash -c "SPARSA_Q_TILE_TMA=1 SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'q_tile or gpu'; $PY scripts/locality_bench.py --ns 8192,65536 --gs 4,16,1 --pools 20 --no-backward --tiles 64x4x2,64x4x3,128x8x2,64x4x2+tma,64x4x3+tma"
# the per-G thresholds (locality.max_waste: 2.0 at G = 1, 1.9 at G = 16, 1.7 at G = 4) on pools whose waste
# falls between (8K: P = 26 / 30 / 34 / 40 give 1.71 / 1.92 / 2.11 / 2.38 at G = 1 and 4, 1.63 / 1.75 / 1.86 / 1.98
# at G = 16): every forward order and the automatic one
step locality_threshold 480 "$PY" scripts/locality_bench.py --ns 8192,65536 --gs 1,16,4 --pools 26,30,34,40 --no-backward
# K / V by TMA on by default on Hopper for bf16 / fp16 (session 21): the q_tile tests with the default, then the crossover waste
# of q_tile against the other orders with TMA, every forward order (for locality.max_waste)
step tma_threshold 560 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'q_tile or gpu'; $PY scripts/locality_bench.py --ns 8192,65536 --gs 1,16,4 --pools 26,30,34,40,46 --no-backward; $PY scripts/locality_bench.py --ns 8192,65536 --gs 2,8 --pools 30,40 --no-backward"
# the session-21 thresholds (locality.max_waste 2.1-2.4) on the benchmark's random selections, where 8K G = 16
# (waste 2.36) now takes q_tile; with the q_tile / locality GPU tests first; then q_tile with smaller tiles
# (16 / 32 rows) on random selections: at G = 16 a 16-row tile is one token (waste 1: q_outer's work, but with
# TMA and Triton's pipelining), a candidate for the 8K forward target at G >= 16
step thresholds_random 560 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'q_tile or gpu or locality or tma'; $PY benchmarks/sparse_attention.py --ns 8192,16384 --q-tile --out $LOGS/thresholds_random.json; $PY scripts/locality_bench.py --ns 8192,16384 --gs 16,8,4 --pools 0 --no-backward --tiles 16x4x3+tma,16x2x3+tma,16x1x3+tma,32x4x3+tma; $PY scripts/locality_bench.py --ns 65536 --gs 16 --pools 0 --no-backward --tiles 16x4x3+tma,16x2x3+tma"
# the same at 8K only, for a short device budget: random selections, G = 16 (waste 2.36: q_tile since session 21)
step random_8k_slim 200 bash -c "$PY benchmarks/sparse_attention.py --ns 8192 --gs 16,8,4 --q-tile --out $LOGS/random_8k_slim.json; $PY scripts/locality_bench.py --ns 8192 --gs 16,8 --pools 0 --no-backward --tiles 16x4x3+tma,32x4x3+tma"
# kernels of forward+backward on pooled selections: the KV-outer backward (default after q_tile) against
# q_tile's own (its dQ kernel writes dQ once per tile instead of per-pair partials)
step pooled_bwd_kernels 420 "$PY" scripts/pooled_bwd_kernels.py --sizes 8192,65536 --groups 4,16,1 --pool 20 --backwards kv_outer,q_tile
# smaller q_tile tiles where waste is high: 32 rows (32 tokens at G = 1, 8 at G = 4) against the default 64, TMA on
step small_tiles 420 "$PY" scripts/locality_bench.py --ns 8192,65536 --gs 1,4 --pools 20,30,40 --no-backward --tiles 32x4x3+tma,64x4x3+tma
# the hybrid backward (SPARSA_Q_TILE_BACKWARD=hybrid: KV-outer dK/dV without dQ partials + q_tile's dQ kernel):
# its bf16 GPU tests, then kernel times on pooled selections against the KV-outer and q_tile backwards, then
# with q_tile's dQ kernel loading K / V by TMA (q_tile_backward.DQ_TMA)
step hybrid_bwd 560 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'hybrid'; $PY scripts/pooled_bwd_kernels.py --sizes 8192,65536 --groups 4,16,1 --pool 20 --backwards kv_outer,hybrid,q_tile; $PY scripts/with_flags.py sparsa.ops.sparse_attn.q_tile_backward DQ_TMA scripts/pooled_bwd_kernels.py --sizes 8192,65536 --groups 4,16,1 --pool 20 --backwards hybrid,q_tile"
# the query-outer order on one-token q_tile tiles (SPARSA_ONE_TOKEN_TILES, session 22): the sparse-attention GPU tests,
# then G = 16 with the H100's order rule (query-outer from 32K) with the one-token tiles (auto) and without (0)
step one_token 400 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'gpu or one_token'; for t in auto 0; do SPARSA_DEVICE_TUNING=h100 SPARSA_ONE_TOKEN_TILES=\$t $PY benchmarks/sparse_attention.py --ns 8192,32768,65536 --gs 16 --out $LOGS/one_token_\$t.json | tail -n 6; done"
# G = 16's crossover below 32K on the H100 (query-outer with one-token tiles against KV-outer, forward and
# forward+backward), then 128K G = 16 with and without the one-token tiles (session 24's sweep: its backward 29 ms
# against session 17's 25.5)
step g16_orders 300 bash -c "$PY scripts/order_ab.py --shapes '12288,16;16384,16;24576,16' --orders q_outer,kv_outer --out $LOGS/g16_orders.json; $PY scripts/order_ab.py --shapes '131072,16' --orders q_outer --env SPARSA_ONE_TOKEN_TILES=0,auto --out $LOGS/g16_128k.json"
# forward+backward after the one-token forward at 96K / 128K G = 16 (session 27: same backward kernel times after
# either forward): kernel times, allocator counters and clock, then 128K with expandable allocator segments
step one_token_probe 400 bash -c "$PY scripts/one_token_bwd_probe.py; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $PY scripts/one_token_bwd_probe.py --sizes 131072"
# measured floors of both loop orders on random selections (a gather-only kernel; KV-outer traffic at the copy rate)
step gather_floor 300 "$PY" scripts/gather_floor.py --out "$LOGS/gather_floor.json"
# the query-outer kernel with K / V by TMA: its bf16 GPU tests, then the A/B against the one-token tiles at G = 16
step q_outer_tma 560 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'gpu and (query_outer_tma or one_token or matches_reference)' && $PY scripts/q_outer_tma_ab.py --backward"
# with the TMA query-outer kernel on by default (session 29): its GPU tests, G = 16's orders (query-outer, KV-outer
# and the automatic one, forward and forward+backward), the issue's benchmark at G = 16 (8K-128K, dense SDPA in the
# same run), then the query-tile waste threshold at G = 16 against the TMA query-outer kernel
step q_outer_tma_orders 560 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'gpu and (query_outer_tma or matches_reference)'; $PY scripts/order_ab.py --shapes '8192,16;16384,16' --orders q_outer,kv_outer,auto --out $LOGS/q_outer_tma_orders.json; $PY benchmarks/sparse_attention.py --gs 16 --out $LOGS/g16_sweep.json; $PY scripts/locality_bench.py --ns 8192,65536 --gs 16 --pools 30,40,0 --no-backward"
# the TMA query-outer kernel starting past each row's leading padding (q_outer.TMA_SKIP_PADDING, on by default since
# session 29): its bf16 GPU tests, then the A/B with it on (1x2) and off (1x2n)
step q_outer_skip 300 bash -c "SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_sparse_attn_triton.py -k 'gpu and query_outer_tma' && $PY scripts/q_outer_tma_ab.py --shapes '8192,16;16384,16;65536,16' --configs 1x2,1x2n --rounds 3"
# G = 16's orders on any GPU with the TMA query-outer kernel (query-outer vs KV-outer, forward and
# forward+backward, 8K-128K), then the issue's benchmark at G = 16 (the automatic order): on an H200 this settles
# whether its G = 16 rule (device_tuning.large_group_kv_outer, measured before that kernel existed) still holds
step g16_tma_orders 560 bash -c "$PY scripts/order_ab.py --shapes '8192,16;16384,16;32768,16;65536,16;131072,16' --orders q_outer,kv_outer --out $LOGS/g16_tma_orders.json; $PY benchmarks/sparse_attention.py --gs 16 --out $LOGS/g16_bench.json"
# the warp-specialised KV-outer MAIN (kv_gluon_ws.py, the default for G >= 2 since session 31): its GPU tests
# (equal to the default Gluon MAIN, against float64), then the KV-outer forward with it off / on, interleaved
step kv_ws 420 bash -c "env SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q -x tests/ops/test_kv_gluon_ws.py -k gpu && $PY scripts/order_ab.py --shapes '8192,2;8192,4;8192,8;16384,8;65536,4;65536,8' --orders kv_outer --env SPARSA_KV_GLUON_WS=0,1 --no-backward --rounds 3 --out $LOGS/kv_ws.json"
# where the warp-specialised MAIN's time goes: its kernel time with the query gathers, K / V reloads or partial
# stores removed (SPARSA_KV_WS_PROBE; timing only)
step kv_ws_probe 300 "$PY" scripts/kv_ws_probe.py --sizes 8192,65536 --groups 8 --probes 0,1,2,4,6,7
# the warp-specialised MAIN at G = 1 (off by default there: untimed until session 32), KV-outer forward off / on
step kv_ws_g1 200 "$PY" scripts/order_ab.py --shapes '8192,1;16384,1' --orders kv_outer --env SPARSA_KV_GLUON_WS=0,1 --no-backward --rounds 2 --out "$LOGS/kv_ws_g1.json"
# the warp-specialised MAIN's other schedules (SPARSA_KV_WS_CONFIG: 3 stages; a partial buffer per warpgroup, the
# stage released after the MMAs): their GPU tests, then the KV-outer forward with each, interleaved
step kv_ws_sched 420 bash -c "env SPARSA_POISON_OUTPUTS=1 $PY -m pytest -q tests/ops/test_kv_gluon_ws.py -k 'gpu and schedules' && $PY scripts/order_ab.py --shapes '8192,8;8192,2;65536,8' --orders kv_outer --env SPARSA_KV_WS_CONFIG=3x4,3x3,3x3o --no-backward --rounds 2 --out $LOGS/kv_ws_sched.json"
# where the Gluon dK/dV kernel's time goes (SPARSA_KV_BWD_PROBE: only the first tile's rows gathered; no dQ partial
# stores), forward+backward at 8K and 64K, G = 8
step kv_bwd_probe 300 "$PY" scripts/kv_ws_probe.py --kernel bwd --sizes 8192,65536 --groups 8
# the automatic order's host cost at 8K (session 32: its forward 0.09-0.13 ms slower than the same kernels forced at
# G = 2-8): host time per call of both, and cProfile of the automatic forward
step sa_auto_host 120 "$PY" scripts/sa_host_overhead.py --sizes 8192 --groups 2,8 --orders auto,kv_outer --profile 8192,8 --profile-call auto,fwd
# session 32's 8K gap (automatic order 0.09-0.13 ms slower than forced KV-outer at G = 2-8, only where the
# warp-specialised MAIN runs; equal in session 30 without it): both orders with it off / on, then the automatic order
# with the locality check off / on
step ws_auto_ab 300 bash -c "$PY scripts/order_ab.py --shapes '8192,2;8192,8;16384,8' --orders kv_outer,auto --env SPARSA_KV_GLUON_WS=0,1 --no-backward --rounds 2 --out $LOGS/ws_auto_ab.json; $PY scripts/order_ab.py --shapes '8192,2;8192,8' --orders auto --env SPARSA_LOCALITY_CHECK=0,1 --no-backward --rounds 2 --out $LOGS/ws_auto_locality.json"
step locality_list 540 "$PY" scripts/locality_bench.py --ns 8192,16384,65536 --gs 4,16,1 --pools 20,40,0 --tiles 128x8
step sa_kernel_times 200 "$PY" scripts/sa_kernel_times.py --sizes 65536 --groups 1,4 --calls 3
# host enqueue time per call against do_bench (is a shape launch-bound?), kernels per call, cProfile at 8K G = 4
step sa_host_overhead 240 "$PY" scripts/sa_host_overhead.py --sizes 4096,8192,16384 --groups 1,4,8 --profile 8192,4
for f in "$LOGS"/bench_*.log; do [ -f "$f" ] && { echo "== $(basename "$f")"; tail -n 40 "$f"; }; done
echo "== summary ($(cat "$LOGS/env.txt"))"
cat "$SUMMARY"
