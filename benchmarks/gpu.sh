#!/usr/bin/env bash
# All of the project's GPU measurement in one go, on one GPU, in under 10 minutes: iteration time of
# the method presets on the real architectures with random weights (SD3.5-Medium at 512x512 with CFG
# 4.5: the MixGRPO paper's five presets; FLUX.1-dev at 720x720: those five and Flow-GRPO-Fast,
# DiffusionNFT and AWM), each method's floor, and FLUX's growth with T, group size and resolution;
# then MixGRPO on FLUX.1-dev with each speed option on (the best attention backend installed,
# torch.compile of rollout and training); then a rollout + LoRA training entry (MixGRPO) per newer
# backbone: FLUX.2-klein-4B (384x384, CFG 4), Z-Image (512x512, CFG 5 = g 4), SD3.5-Large (512x512,
# CFG 3.5) and Qwen-Image (512x512, true CFG 4, gradient checkpointing). Writes OUT/sd35-medium.json,
# OUT/flux-dev.json, OUT/flux-dev-attention.json, OUT/flux-dev-compile.json, OUT/<backbone>.json for
# flux2-klein, z-image, sd35-large and qwen-image, and OUT/gpu.log.
#
#   bash benchmarks/fetch_wheels.sh                                   # here, once (needs the registry)
#   bash benchmarks/gpu.sh --wheels benchmarks/wheels --out OUT       # on the GPU machine
#   bash benchmarks/gpu.sh --device cpu --out OUT                     # the CPU dry run (tiny sizes)
#
# The GPU machine has torch, transformers, accelerate, peft, attrs, pluggy, matplotlib, ... but no
# diffusers or gin-config and no internet: whatever of the project's needs does not import is
# installed from the wheels in --wheels (into a folder under /tmp, put on PYTHONPATH), then mixgrpo
# itself from this working tree the same way. Nothing is built or downloaded there. PYTHON (default
# python3) is the interpreter that holds torch.
#
# Budget (one H100/H200; --budget-s, default 570 s: the whole script, inside the 10-minute limit of one
# command on the project's GPU machines): every preset runs 1 warm-up + 1 timed iteration of
# 1 prompt x 4 samples at T = 25, numbered from iteration 140 (the windows where they are mid-run:
# MixGRPO's at step 5, its run's average 5.5; Flash's at step 7, whose 16 grid steps are about its
# average, 15.6, over the paper's 300 iterations; the steps up to the window's first are paid once per
# group of 4). The FLUX sweeps time one iteration per point and are skipped, point by point, once the
# budget less what comes after them (RESERVE: the speed options, 60 s + --compile-s, and the newer
# backbones, 4 x 40 s) has passed, so the tables always come back. The speed options run after FLUX's
# table and sweeps, MixGRPO alone (1 warm-up + 1 timed iteration; options off is its row of
# flux-dev.json): the attention backend is the first installed of flash, xformers, _native_flash; the
# compiled run compiles each kind of FLUX block once (regional compilation) under a time limit of its
# own (--compile-s, default 150 s on a GPU, 600 s in the CPU dry run). The newer backbones come last,
# smallest first, MixGRPO alone with LoRA at its recipe's rank and no warm-up iteration (the
# per-evaluation costs, measured first, run the forward, the forward+backward and a decode, which warms
# the kernels); on a GPU an entry starts only while 40 s of the budget are left and is stopped at
# the budget's end (its JSON then missing; the log says so). Estimated from the issue's FLUX.1 numbers
# (98 ms forward, 282 ms forward+backward per sample), not measured: about 25-50 s each, Qwen-Image
# (20B) the longest. What does not fit one H100 (80 GB) is not run: full fine-tuning of any of them
# (--lora-rank 0: fp32 weights, gradients and AdamW's two moments are 16 bytes per parameter, 62 GB
# for FLUX.2-klein-4B and 98 GB for Z-Image before any activation),
# and Qwen-Image without gradient checkpointing (41 GB of bf16 weights, then a micro-batch of 2 through
# 60 blocks of 1,536 tokens), so its entry trains with it, as backbones/qwenimage.gin does.
set -euo pipefail

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --wheels DIR  --out DIR  --device cuda|cpu  --budget-s SECONDS  --compile-s SECONDS"
}

WHEELS=""
OUT=""
DEVICE=""
BUDGET=570
COMPILE_S=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --device) DEVICE="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --budget-s) BUDGET="${2:?--budget-s needs a number of seconds}"; shift 2 ;;
        --compile-s) COMPILE_S="${2:?--compile-s needs a number of seconds}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$DEVICE" in ""|cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "gpu.sh: --budget-s must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case "$COMPILE_S" in *[!0-9]*) echo "gpu.sh: --compile-s must be a whole number of seconds, got '$COMPILE_S'" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

main() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on ${HOSTNAME:-?}, repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true

    # 1. what the project needs, installed only where it does not import -------------------------------
    check() {
        "$PYTHON" - <<'PY'
import importlib.metadata as md
import sys
missing = []
for module in ("torch", "transformers", "accelerate", "peft", "attrs", "pluggy", "diffusers", "gin", "matplotlib"):
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{module} ({type(exc).__name__}: {exc})")
# the plugins the runs load (an older install lacks the newer backbones and objectives)
needed = {"flux", "sd3", "flux2", "zimage", "qwenimage", "schedules_fast", "diffusionnft", "awm"}
absent = needed - {e.name for e in md.entry_points(group="mixgrpo")}
if not missing and absent:
    missing.append(f"mixgrpo (not installed, or too old: entry points {', '.join(sorted(absent))} are missing)")
if missing:
    print("missing: " + "; ".join(missing))
    sys.exit(1)
PY
    }
    if ! check; then
        if [ -z "$WHEELS" ]; then
            echo "gpu.sh: the packages above do not import and no --wheels folder was given." >&2
            echo "        Run 'bash benchmarks/fetch_wheels.sh' where pip reaches the registry and pass --wheels." >&2
            exit 3
        fi
        [ -d "$WHEELS" ] || { echo "gpu.sh: --wheels folder '$WHEELS' does not exist" >&2; exit 3; }
        SITE="${MIXGRPO_SITE:-/tmp/mixgrpo-site}"
        echo "gpu.sh: installing from $WHEELS into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        # mixgrpo itself, from this working tree (its entry points register the plugins)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
            --target "$SITE" "$REPO"
        check || { echo "gpu.sh: still missing after installing the wheels (see above)" >&2; exit 3; }
    fi

    # 2. the device ------------------------------------------------------------------------------------------
    if [ -z "$DEVICE" ]; then
        if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())')" = True ]; then
            DEVICE=cuda
        else
            echo "gpu.sh: torch sees no GPU; pass --device cpu for the dry run (tiny sizes)" >&2
            exit 4
        fi
    fi
    # the compiled run's limit: regional compilation of FLUX's two kinds of blocks, forward and backward
    COMPILE_S="${COMPILE_S:-$([ "$DEVICE" = cuda ] && echo 150 || echo 600)}"
    if [ "$DEVICE" = cuda ]; then
        SIZES=(--prompts 1 --group-size 4 --warmup 1 --iterations 1 --at-iteration 140)
    else  # the dry run: the same steps on shrunken architectures, one thread (shared cores)
        SIZES=(--tiny --threads 1 --prompts 1 --group-size 2 --warmup 0 --iterations 1 --at-iteration 140)
    fi

    # 3. the measurements --------------------------------------------------------------------------------
    bench() {  # bench NAME JSON-NAME [flags...]
        local name="$1" json="$2"; shift 2
        echo
        echo "=== $json ($(date -u +%H:%M:%S), ${SECONDS}s in) ==="
        "$PYTHON" benchmarks/iteration_time.py --backbone "$name" --device "$DEVICE" "${SIZES[@]}" \
            --json "$OUT/$json.json" "$@"
    }
    newer() {  # newer NAME: MixGRPO alone, no warm-up iteration; on a GPU within what is left of the budget
        local name="$1" left=$((BUDGET - SECONDS)) limit=() extra=()
        if [ "$name" = qwen-image ]; then
            extra=(--gradient-checkpointing)  # 20B on 80 GB: see the budget notes above
        fi
        echo
        echo "=== $name ($(date -u +%H:%M:%S), ${SECONDS}s in) ==="
        if [ "$DEVICE" = cuda ]; then
            if [ "$left" -lt "$NEWER_S" ]; then
                echo "gpu.sh: $name skipped: ${left}s of the ${BUDGET}s budget left (--budget-s)"
                return
            fi
            limit=(timeout --signal=INT "$left")
        fi
        local rc=0
        "${limit[@]}" "$PYTHON" benchmarks/iteration_time.py --backbone "$name" --device "$DEVICE" "${SIZES[@]}" \
            --json "$OUT/$name.json" --methods mixgrpo --no-sweeps --warmup 0 "${extra[@]}" || rc=$?
        if [ "$rc" = 124 ]; then
            echo "gpu.sh: $name stopped at the end of the ${BUDGET}s budget (no $name.json)"
        elif [ "$rc" != 0 ]; then  # a failure is the script's, as for every other entry
            exit "$rc"
        fi
    }
    BACKEND="$("$PYTHON" - "$DEVICE" <<'PY'
import sys
import torch
from mixgrpo.plugins.backbones.diffusers_base import attention_backends
available = attention_backends(torch.device(sys.argv[1]))
print(next((b for b in ("flash", "xformers", "_native_flash") if b in available), "_native_math"))
PY
)"
    bench sd35-medium sd35-medium --no-sweeps
    # on a GPU the sweeps stop starting points early enough to leave what follows them its time
    NEWER=(flux2-klein z-image sd35-large qwen-image)  # smallest first: the largest is the one a budget cuts
    NEWER_S=40  # the time each newer backbone's entry is given in the plan (estimated: 25-50 s on an H100)
    RESERVE=$([ "$DEVICE" = cuda ] && echo $((60 + COMPILE_S + ${#NEWER[@]} * NEWER_S)) || echo 0)
    bench flux-dev flux-dev --methods all --budget-s $((BUDGET > SECONDS + RESERVE ? BUDGET - SECONDS - RESERVE : 0))
    # the speed options, MixGRPO alone (options off = its row of flux-dev.json)
    bench flux-dev flux-dev-attention --methods mixgrpo --no-sweeps --attention-backend "$BACKEND"
    echo
    echo "=== flux-dev-compile ($(date -u +%H:%M:%S), ${SECONDS}s in, limit ${COMPILE_S}s) ==="
    if ! timeout --signal=INT "$COMPILE_S" "$PYTHON" benchmarks/iteration_time.py --backbone flux-dev \
            --device "$DEVICE" "${SIZES[@]}" --json "$OUT/flux-dev-compile.json" --methods mixgrpo --no-sweeps \
            --compile all; then
        echo "gpu.sh: the compiled run did not finish within --compile-s ${COMPILE_S}s (compilation included)"
    fi
    # the newer backbones: a rollout and a LoRA training step each (MixGRPO, the recipe's LoRA rank)
    for name in "${NEWER[@]}"; do
        newer "$name"
    done
    echo
    echo "gpu.sh: done in ${SECONDS}s; results in $OUT"
}

set -o pipefail
main 2>&1 | tee -a "$OUT/gpu.log"
