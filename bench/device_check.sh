#!/usr/bin/env bash
# The GPU check of issue 15, run ON THE LENT GPU MACHINE in the repository root (prepared here by
# bench/gpu_wheel.sh, which prints the exact sequence of device calls).
#
#   --receive   move the onnxruntime-gpu wheel parts carried in this call (.cache/gpu-wheels/ort-gpu.part-NN,
#               checked against the carried parts.sha256) into the stash, .cache/gpu-stash/ in the repo copy
#               there: an ignored path that no call carries, which a warm machine keeps between calls (the
#               device README: ignored outputs already there are kept; a fresh machine starts bare). Says
#               which parts the stash holds and which are still missing. A machine stays warm 30 s after a
#               call: make the calls back to back. If it went back meanwhile, the stash is gone and this
#               says so: start again with the first part.
#   --run       join the parts, check the wheel's sha256 (pinned below, PyPI's), `pip install --no-deps
#               --target` it and the carried lightgbm wheel into a folder of their own (the machine's
#               packages, its CPU onnxruntime included, are left as they are; PYTHONPATH puts the GPU
#               build first), point LD_LIBRARY_PATH at the CUDA 13 / cuDNN 9 libraries of the machine's
#               nvidia-* wheels (PyTorch's), then bench/device_check.py run: (a) compile, (b) parity,
#               (c) every node on CUDAExecutionProvider, (d) throughput table. PASS / FAIL lines, RESULT:.
#   --allow-cpu with --run: without a usable CUDA provider, check parity on the CPU provider and SKIP the
#               CUDA steps (for trying the script on a machine without a GPU).
#   --wheel F   with --run: install this wheel file instead of joining parts (a local try: the GPU wheel on
#               a machine with no GPU, with --allow-cpu); `--wheel none`: the interpreter's own onnxruntime.
#
# Results go under $OUT (the device tool's folder that comes back), else /tmp/mailsift-device-check:
# summary.txt, throughput.txt, placement.txt, profile.json, device_check.log. Exit status 0 only if every
# check passed. Everything is bounded to about 5 minutes (the Python part by `timeout`).
#
# Needs there: python3 (3.12) with numpy, scipy, onnx, pip; NOT lightgbm or onnxruntime-gpu (carried).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

# Keep in step with pyproject.toml's `gpu` extra and bench/gpu_wheel.sh.
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
ORT_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
LGB_WHEEL=lightgbm-4.7.0-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
LGB_SHA256=d23e922acd891e77212e4d0fbcee9ba973c96dee479491341d05ba595357ebb7

CARRIED=.cache/gpu-wheels
STASH=${MAILSIFT_GPU_STASH:-$ROOT/.cache/gpu-stash}
WORK=${MAILSIFT_GPU_WORK:-/tmp/mailsift-gpu}
RESULTS=${OUT:-/tmp/mailsift-device-check}
PY=${PYTHON:-python3}
PY_BUDGET_S=${PY_BUDGET_S:-240}

receive=0 run=0 allow_cpu=0 wheel=""
while [ $# -gt 0 ]; do
    case $1 in
        --receive) receive=1 ;;
        --run) run=1 ;;
        --allow-cpu) allow_cpu=1 ;;
        --wheel) wheel=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [ $((receive + run)) = 0 ]; then
    echo "say --receive, --run or both (--help)" >&2
    exit 2
fi

say() { echo "$1 $2: $3"; }

stash_state() {  # which parts of the manifest the stash holds; 0 when all
    local missing=() part
    [ -f "$STASH/parts.sha256" ] || { echo "stash $STASH: empty (no parts.sha256)"; return 1; }
    while read -r _ part; do
        [ -f "$STASH/$part" ] || missing+=("$part")
    done < "$STASH/parts.sha256"
    echo "stash $STASH: holds $(find "$STASH" -maxdepth 1 -name 'ort-gpu.part-*' | wc -l) of" \
        "$(wc -l < "$STASH/parts.sha256") parts; missing: ${missing[*]:-none}"
    [ ${#missing[@]} = 0 ]
}

if [ "$receive" = 1 ]; then
    mkdir -p "$STASH"
    boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    if [ -f "$STASH/boot_id" ] && [ "$(cat "$STASH/boot_id")" != "$boot" ]; then
        echo "note: the stash was written under another boot ($(cat "$STASH/boot_id")); this one is $boot"
    fi
    echo "$boot" > "$STASH/boot_id"
    [ -f "$CARRIED/parts.sha256" ] || { say FAIL receive "no $CARRIED/parts.sha256 carried"; exit 1; }
    if [ -f "$STASH/parts.sha256" ] && ! cmp -s "$CARRIED/parts.sha256" "$STASH/parts.sha256"; then
        echo "parts.sha256 differs from the stash's: another split; the stash's parts are dropped"
        rm -f "$STASH"/ort-gpu.part-*
    fi
    cp "$CARRIED/parts.sha256" "$STASH/parts.sha256"
    shopt -s nullglob
    got=("$CARRIED"/ort-gpu.part-*)
    shopt -u nullglob
    for f in "${got[@]}"; do
        name=$(basename "$f")
        expected=$(awk -v n="$name" '$2 == n {print $1}' "$STASH/parts.sha256")
        actual=$(sha256sum "$f" | cut -d' ' -f1)
        if [ -z "$expected" ] || [ "$expected" != "$actual" ]; then
            say FAIL receive "$name: sha256 $actual, manifest ${expected:-has no such part}"
            exit 1
        fi
        mv -f "$f" "$STASH/$name"
        echo "received $name ($(( $(stat -c %s "$STASH/$name") / 1048576 )) MiB, sha256 ok)"
    done
    [ ${#got[@]} -gt 0 ] || echo "no part carried in this call"
    if stash_state; then echo "all parts here: next, --run"; fi
    [ "$run" = 1 ] || exit 0
fi

# --- run ------------------------------------------------------------------------------------------------
checks() {
    echo "== bench/device_check.sh --run on $(hostname) at $(date -u +%FT%TZ); results in $RESULTS"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not available"

    if [ "$wheel" = none ]; then
        echo "--wheel none: the interpreter's own onnxruntime, nothing joined or installed for it"
    elif [ -z "$wheel" ]; then
        if ! stash_state; then
            say FAIL wheel "parts missing: the machine went back between calls (or a call was skipped); carry them again from the first"
            return 1
        fi
        wheel=$WORK/$ORT_WHEEL
        rm -f "$wheel"
        while read -r _ part; do cat "$STASH/$part"; done < "$STASH/parts.sha256" > "$wheel"
        actual=$(sha256sum "$wheel" | cut -d' ' -f1)
        if [ "$actual" != "$ORT_SHA256" ]; then
            say FAIL wheel "joined $ORT_WHEEL has sha256 $actual, pinned $ORT_SHA256"
            return 1
        fi
        say PASS wheel "$ORT_WHEEL joined from $(wc -l < "$STASH/parts.sha256") parts, sha256 $ORT_SHA256 as pinned"
    else
        echo "wheel given: $wheel (sha256 $(sha256sum "$wheel" | cut -d' ' -f1)), no parts joined"
    fi

    lgb=$CARRIED/$LGB_WHEEL
    [ -f "$lgb" ] || lgb=$STASH/$LGB_WHEEL
    wheels=()
    [ "$wheel" = none ] || wheels+=("$wheel")
    if [ -f "$lgb" ] && [ "$(sha256sum "$lgb" | cut -d' ' -f1)" = "$LGB_SHA256" ]; then
        wheels+=("$lgb")
    else
        echo "lightgbm wheel not carried or not as pinned: (a) will use an installed lightgbm, if any"
    fi

    # A folder of its own: the machine's site-packages (its CPU onnxruntime, torch) stay as they are.
    SITE=$WORK/site
    rm -rf "$SITE"
    t0=$SECONDS
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SITE" "${wheels[@]}"
        echo "installed into $SITE in $((SECONDS - t0)) s: ${wheels[*]##*/}"
    fi
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
    export ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1

    # CUDA 13 / cuDNN 9 libraries the GPU build loads (libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10,
    # libcufft.so.12, libcudnn*.so.9, libnvrtc.so.13): from the nvidia-* wheels PyTorch brought, else the
    # toolkit's folder. Found by name, wherever those wheels put them.
    libdirs=$(
        "$PY" - <<'EOF'
import os, site, sys
wanted = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcufft.so.12",
          "libcudnn.so.9", "libnvrtc.so.13")
roots = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
found = {}
for root in roots:
    for top in ("nvidia", "torch/lib"):
        for folder, _, files in os.walk(os.path.join(root, top)):
            for name in wanted:
                if name in files and name not in found:
                    found[name] = folder
for cuda in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
    for name in wanted:
        if name not in found and os.path.exists(os.path.join(cuda, name)):
            found[name] = cuda
for name in wanted:
    print(f"  {name}: {found.get(name, 'NOT FOUND')}", file=sys.stderr)
print(":".join(dict.fromkeys(found.values())))
EOF
    )
    # lightgbm's library needs the system's libgomp.so.1; PyTorch's renamed copy stands in if there is none
    if ! ldconfig -p 2>/dev/null | grep -q 'libgomp\.so\.1 '; then
        gomp=$("$PY" -c 'import glob, os, torch; print(next(iter(sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))), ""))' 2>/dev/null || true)
        if [ -n "$gomp" ]; then
            mkdir -p "$WORK/gomp" && ln -sf "$gomp" "$WORK/gomp/libgomp.so.1"
            libdirs=${libdirs:+$libdirs:}$WORK/gomp
            echo "  libgomp.so.1: none in ldconfig; using PyTorch's $gomp"
        else
            echo "  libgomp.so.1: NOT FOUND (lightgbm will not load: (a) then uses the carried graphs)"
        fi
    fi
    export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

    args=(run --data "$CARRIED/device-check-data.npz" --out "$RESULTS")
    [ "$allow_cpu" = 1 ] && args+=(--allow-cpu)
    [ -n "${SIZES:-}" ] && args+=(--sizes "$SIZES")
    [ -n "${SECONDS_PER_SIZE:-}" ] && args+=(--seconds "$SECONDS_PER_SIZE")
    status=0
    timeout --kill-after=10 "$PY_BUDGET_S" "$PY" bench/device_check.py "${args[@]}" || status=$?
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        say FAIL time "bench/device_check.py ran past $PY_BUDGET_S s and was stopped"
    fi
    echo "== done in $SECONDS s, exit status $status"
    return "$status"
}

mkdir -p "$RESULTS" "$WORK"
checks 2>&1 | tee "$RESULTS/device_check.log"
