#!/usr/bin/env bash
# One prepared GPU check for lwz: run on a machine with one H100/H200 and no network, <= 8 minutes.
#
#   bash bench/device_check.sh            # run every step
#   bash bench/device_check.sh --dry-run  # print every step (command + time limit); runs anywhere
#
# Steps, cheapest first so a short run still reports the most: environment, extension build, the
# two ceilings (bf16 8192^3 matmul, device-to-device copy), the CUDA tests (CUDA vs CPU twins,
# Triton kernels in bf16 vs references), two steps of the tiny default trained on the GPU in bf16,
# the packing and decode-attention benchmarks, the log-prob and GRPO-loss kernel benchmarks, the
# rollout benchmark, profile_step at 14336 (and 8192) tokens for the Qwen2.5-1.5B shape, a CPT step
# at 32768 tokens on that shape, the step's
# data path at ~29M tokens, then the log-prob and GRPO-loss kernels against torch.compile of their
# torch paths.
# Every step runs under `timeout`; a failure is recorded, never fatal. Outputs:
# bench/results/<date>-<gpu>.json and .md (every JSON written during the run merged), per-step
# logs in bench/results/logs-<date>-<gpu>/, and as the last lines a table: step, status, seconds,
# key number.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), BUDGET_S (default 470,
# the whole run), MAX_JOBS (extension build jobs, default: all cores), SKIP (comma-separated step
# names to skip, e.g. SKIP=build,tests_cuda), RESULTS (output folder, default bench/results),
# LWZ_COMMIT (the commit the results are recorded under; set it on a copied tree, whose .git may
# be absent or stale). Wheels in .whl/ (bash bench/fetch_wheels.sh, run where pip has a registry:
# Liger-Kernel for the log-prob comparison) are installed first, into a private folder.
set -uo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) DRY=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET_S="${BUDGET_S:-470}"
RESERVE_S=15           # kept for collecting the results at the end
START=$SECONDS
unset TRITON_INTERPRET  # the CUDA tests must compile Triton for real

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
GPU_TAG="$(printf '%s' "${GPU_NAME:-cpu}" | tr '[:upper:]' '[:lower:]' | grep -oE 'h200|h100|h800|a100|l40s' | head -n1)"
GPU_TAG="${GPU_TAG:-$( [[ -n "$GPU_NAME" ]] && echo gpu || echo cpu )}"
DATE="$(date -u +%Y%m%d-%H%M)"
RES="${RESULTS:-bench/results}"
SKIP=",${SKIP:-},"
TAG="$DATE-$GPU_TAG"
LOGS="$RES/logs-$TAG"
STEPS_TSV="$LOGS/steps.tsv"
MARK="$LOGS/.start"
NPROC="$(nproc 2>/dev/null || echo 4)"
export MAX_JOBS="${MAX_JOBS:-$NPROC}"

if [[ $DRY -eq 0 ]]; then
  mkdir -p "$LOGS"
  : > "$STEPS_TSV"
  touch "$MARK"
  sleep 1  # result files written from now on are newer than the mark
fi

NAMES=()
STATUSES=()
# step NAME LIMIT_S JSON|- CMD...: run CMD under timeout, log to $LOGS/NAME.log, record the status.
step() {
  local name="$1" limit="$2" json="$3"
  shift 3
  local left=$(( BUDGET_S - RESERVE_S - (SECONDS - START) ))
  if [[ "$SKIP" == *",$name,"* ]]; then
    skip "$name" "listed in SKIP"
    return 0
  fi
  if [[ $DRY -eq 1 ]]; then
    printf '[dry-run] step %-16s timeout %4ss  %s\n' "$name" "$limit" "$*"
    NAMES+=("$name"); STATUSES+=("dry-run")
    return 0
  fi
  local status secs rc t0
  if (( left < 10 )); then
    status="skipped: time budget spent"
    secs=0
  else
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    secs=$(( SECONDS - t0 ))
    tail -n 15 "$LOGS/$name.log"
    if (( rc == 0 )); then
      status="ok"
    elif (( rc == 124 || rc == 137 )); then
      status="timeout (${limit}s)"
    else
      status="failed (rc=$rc)"
    fi
  fi
  [[ "$json" == "-" ]] && json=""
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$LOGS/$name.log" "$json" >> "$STEPS_TSV"
  NAMES+=("$name"); STATUSES+=("$status")
}

# skip NAME WHY: record a step that cannot run here.
skip() {
  if [[ $DRY -eq 1 ]]; then
    printf '[dry-run] step %-16s skipped: %s\n' "$1" "$2"
  else
    echo "=== $1: skipped: $2"
    printf '%s\tskipped: %s\t0\t\t\n' "$1" "$2" >> "$STEPS_TSV"
  fi
  NAMES+=("$1"); STATUSES+=("skipped: $2")
}

# bench_step NAME MODULE LIMIT [ARGS...]: a bench module's main(ARGS) when its file exists.
bench_step() {
  local name="$1" module="$2" limit="$3"
  shift 3
  local file="${module//.//}.py"
  if [[ ! -f "$file" ]]; then
    skip "$name" "$file not present"
    return 0
  fi
  local json="$RES/${name}-$GPU_TAG.json"
  step "$name" "$limit" "$json" "$PYTHON" -m bench.common run "$module" "$@" --out "$json"
}

echo "lwz device check: $TAG (budget ${BUDGET_S}s, python $PYTHON)"

# 0. optional comparison packages (Liger-Kernel) from wheels fetched beforehand by
#    bench/fetch_wheels.sh into .whl/ (no network here): installed into a private folder that
#    every later step sees through PYTHONPATH
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="/tmp/lwz-site-$TAG"
  step wheels 60 - "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  if [[ $DRY -eq 0 && "${STATUSES[-1]}" == "ok" ]]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  skip wheels "no .whl/ (bash bench/fetch_wheels.sh fetches Liger-Kernel for the log-prob comparison)"
fi

# 1. environment
step env 60 - bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'nvidia-smi: not available'; \
$PYTHON -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())'; \
$PYTHON -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: absent'; \
$PYTHON -c 'import flash_attn; print(\"flash_attn\", flash_attn.__version__)' 2>/dev/null || echo 'flash_attn: absent'; \
$PYTHON -c 'import liger_kernel.transformers; from importlib.metadata import version; print(\"liger_kernel\", version(\"liger-kernel\"))' 2>/dev/null || echo 'liger_kernel: absent'"

# 2. the extension, built in place here (setup.py drives CMake). Not `pip install -e .`: recent
#    setuptools turn that into an isolated PEP 517 build that fetches setuptools, and there is no
#    network. LWZ_CUDA=1: a failing CUDA build is an error, not a silent CPU-only build.
if [[ -f setup.py ]]; then
  step build 240 - env LWZ_CUDA=1 "$PYTHON" setup.py build_ext --inplace
else
  skip build "no setup.py"
fi
step ext_import 60 - "$PYTHON" -c "import lwz.packing as p; print('lwz.packing backend:', p.BACKEND)"

# 3. ceilings
step ceilings 90 "$RES/ceilings-$GPU_TAG.json" "$PYTHON" -m bench.common ceilings --json "$RES/ceilings-$GPU_TAG.json"

# 4. CUDA tests (CUDA vs CPU twins, Triton kernels compiled for real vs the references); only the
#    tests with "cuda" in their names or files: the CPU tests run in CI.
#    LWZ_TEST_INTERPRET=0: compiled kernels (test_kernels_cuda.py), not the interpreter
TESTS=()
for t in tests/test_kernels_cuda.py tests/test_packing.py tests/test_rollout.py; do
  [[ -f "$t" ]] && TESTS+=("$t")
done
if (( ${#TESTS[@]} )); then
  step tests_cuda 120 - env LWZ_TEST_INTERPRET=0 TRITON_INTERPRET=0 \
    "$PYTHON" -m pytest -q --no-header -p no:cacheprovider -k cuda "${TESTS[@]}"
else
  skip tests_cuda "no test files"
fi

# 5. the trainer end to end on the GPU as the big configs run it: nccl, FSDP2 with fp32 master
#    weights and bf16 compute, varlen attention, the CUDA rollout (Triton decode kernel, CUDA graphs),
#    the bf16 Triton log-prob and GRPO kernels; 2 steps of the tiny default (metrics in the log folder)
step train_tiny 90 - "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 lwz/train.py \
  --config configs/tiny.toml --steps=2 --distributed.backend=auto --model.dtype=float32 \
  --distributed.param_dtype=bfloat16 --rollout.max_new_tokens=64 --logging.run_dir="$LOGS/runs"

# 6. microbenchmarks at their CUDA default sizes, the quick ones first
bench_step bench_pack bench.bench_pack 45
bench_step bench_decode_attn bench.bench_decode_attention 30

# 6a. the log-prob kernels' launch configs tuned at 16k tokens (pointer loads vs TMA descriptors,
#    tile shapes, flattened loops); the fastest correct pair goes into this tree's launch-config
#    table under the GPU's name (kernels/logprob_configs.json), which every later step reads at
#    import, so the benchmarks and profiles below measure it (bench/results/tune_logprob-<gpu>.json
#    says which it was)
step tune_logprob 200 "$RES/tune_logprob-$GPU_TAG.json" "$PYTHON" -m bench.tune_logprob \
  --out "$RES/tune_logprob-$GPU_TAG.json" --table kernels/logprob_configs.json

# 6b. the Triton kernel benchmarks vs eager torch (torch.compile of the references is left out: it
#    alone takes minutes at these sizes); the log-prob at 4k and at its goal size, 16k tokens
bench_step bench_logprob bench.bench_logprob 130 --sizes 4096,16384 --quick --no-compile
bench_step bench_grpo_loss bench.bench_grpo_loss 45 --no-compile

bench_step bench_rollout bench.bench_rollout 120

# 7. the long-sequence step profile: Qwen2.5-1.5B shape at 14336 tokens, long-tail mix (the padded
#    baseline may run out of memory: that is recorded as its result), one fixed 14336 sequence
#    (padded = packed tokens: isolates the fused log-prob saving), then a long-tail mix of at most
#    8192 tokens a sequence and 8192 a step, whose padded baseline fits, for the packed/padded ratio
step profile_step 150 "$RES/profile_step-$GPU_TAG.json" "$PYTHON" -m bench.profile_step --preset qwen2.5-1.5b \
  --seq-lens 14336 --lengths-mix longtail --tokens-per-step 28672 --warmup 1 --iters 3 \
  --out "$RES/profile_step-$GPU_TAG.json"
step profile_fixed 90 "$RES/profile_step-fixed-$GPU_TAG.json" "$PYTHON" -m bench.profile_step \
  --preset qwen2.5-1.5b --seq-lens 14336 --lengths-mix fixed --tokens-per-step 14336 --warmup 1 --iters 2 \
  --out "$RES/profile_step-fixed-$GPU_TAG.json"
step profile_8k 60 "$RES/profile_step-8k-$GPU_TAG.json" "$PYTHON" -m bench.profile_step --preset qwen2.5-1.5b \
  --seq-lens 8192 --lengths-mix longtail --tokens-per-step 8192 --warmup 1 --iters 3 \
  --out "$RES/profile_step-8k-$GPU_TAG.json"

# 7-cpt. a continual-pretraining step (lwz/pretrain.py's loss) at the paper's 32K context on the
#    Qwen2.5-1.5B shape: one packed micro-batch of 32768 tokens of long-tail documents, activation
#    checkpointing, tokens/s, MFU and peak memory (no padded baseline: it would materialise 20 GB of logits)
step profile_cpt 120 "$RES/profile_step-cpt-$GPU_TAG.json" "$PYTHON" -m bench.profile_step --preset qwen2.5-1.5b \
  --loss cpt --seq-lens 32768 --lengths-mix longtail --tokens-per-step 32768 --no-padded --warmup 1 --iters 3 \
  --out "$RES/profile_step-cpt-$GPU_TAG.json"

# 7a. the step's data path (rollout -> every rank's batch -> plan -> packed micro-batches -> log-probs
#    back): the tensor path vs the pickled-object baseline at the 7B config's step size (~29M tokens),
#    2 gloo ranks on the CPU, then in one process on the GPU as a share of profile_step's step
bench_step bench_data_path bench.bench_data_path 150 --tokens 29000000 --iters 1

# 7b. torch.compile baselines, last: compiling takes a minute or more. The chunked torch log-prob
#    path at the 16k goal size next to our kernel
bench_step bench_logprob_compiled bench.bench_logprob 150 --sizes 16384 --quick \
  --impls triton,torch_chunked_compiled
# and torch.compile of the GRPO loss reference, at the bandwidth-bound 16M tokens only
bench_step bench_grpo_loss_compiled bench.bench_grpo_loss 120 --tokens 16777216 --big-tokens 0

# 8. collect: merged JSON + markdown, and the table as the last lines
if [[ $DRY -eq 1 ]]; then
  printf '[dry-run] step %-16s %s\n' collect "$PYTHON -m bench.common collect --steps $STEPS_TSV --since $MARK --results-dir $RES --out $RES/$TAG"
  echo
  printf '%-16s  %s\n' step status
  for i in "${!NAMES[@]}"; do printf '%-16s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}"; done
  echo "dry run: ${#NAMES[@]} steps listed, nothing executed"
  exit 0
fi
echo "=== collect -> $RES/$TAG.json, $RES/$TAG.md  (total $(( SECONDS - START ))s)"
if ! timeout 60 "$PYTHON" -m bench.common collect --steps "$STEPS_TSV" --since "$MARK" --results-dir "$RES" --out "$RES/$TAG"; then
  echo "collect failed; raw step table:"
  printf '%-16s  %s\n' step status
  for i in "${!NAMES[@]}"; do printf '%-16s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}"; done
fi
exit 0
