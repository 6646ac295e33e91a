#!/usr/bin/env bash
# Prepares, HERE, what the GPU check (bench/device_check.sh) needs carried to the lent GPU machine, and
# prints the device calls that carry it there.
#
# Why: the lent machine (one H200, Python 3.12, PyTorch with CUDA 13 and its nvidia-* wheels, a CPU build of
# onnxruntime, no network) takes the working tree plus carried files up to 64 MiB a call, and the
# onnxruntime-gpu wheel is 244 MiB. So the wheel goes over in parts, one part a call, into a warm machine
# that keeps them between calls (bench/device_check.sh --receive); the last call joins and runs. A machine
# is held warm only 30 s after a call: make the calls back to back.
#
# What it does:
#   1. downloads, into .cache/gpu-wheels/ (git-ignored), the onnxruntime-gpu wheel pinned in pyproject.toml
#      (`gpu` extra) for CPython 3.12 / manylinux x86_64, and the lightgbm wheel (not on the machine;
#      training/tensor_graph.py imports it); checks both against the sha256 pinned below (PyPI's digests);
#   2. writes .cache/gpu-wheels/device-check-data.npz (bench/device_check.py prepare): fixture feature
#      vectors, probe rows and LightGBM's probabilities for them, made here where the extractors are;
#   3. splits the onnxruntime-gpu wheel with `split -b` into parts sized so that a part plus the working
#      tree that travels with every call stays under 64 MiB, and writes their sha256 (parts.sha256);
#   4. prints the sequence of device calls (command and carry list of each).
#
# Usage: bench/gpu_wheel.sh [--no-download]      (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail

cd "$(dirname "$0")/.."

# Keep in step with pyproject.toml's `gpu` extra and bench/device_check.sh.
ORT_VERSION=1.31.1
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
ORT_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
LGB_VERSION=4.7.0
LGB_WHEEL=lightgbm-4.7.0-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
LGB_SHA256=d23e922acd891e77212e4d0fbcee9ba973c96dee479491341d05ba595357ebb7

DIR=.cache/gpu-wheels
DATA=$DIR/device-check-data.npz
MANIFEST=$DIR/parts.sha256
PREFIX=$DIR/ort-gpu.part-
PY=${PYTHON:-.venv/bin/python}
MIB=1048576
LIMIT=$((64 * MIB))     # the working tree plus carried files, per call
MARGIN=$((2 * MIB))     # room for files that appear between now and the calls
MAX_PART=$((59 * MIB))

download=1
for arg in "$@"; do
    case $arg in
        --no-download) download=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

case $DIR in .cache/*) ;; *) echo "$DIR must stay under .cache/ (git-ignored)" >&2; exit 1 ;; esac
if ! git check-ignore -q "$DIR/x"; then
    echo "$DIR is not git-ignored: refusing to put wheels there" >&2
    exit 1
fi
mkdir -p "$DIR"

fetch() {  # NAME VERSION: one wheel for the device's CPython 3.12 on manylinux x86_64, no dependencies
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "$1==$2"
}
if [ "$download" = 1 ]; then
    [ -f "$DIR/$ORT_WHEEL" ] || fetch onnxruntime-gpu "$ORT_VERSION"
    [ -f "$DIR/$LGB_WHEEL" ] || fetch lightgbm "$LGB_VERSION"
fi
(cd "$DIR" && printf '%s  %s\n%s  %s\n' "$ORT_SHA256" "$ORT_WHEEL" "$LGB_SHA256" "$LGB_WHEEL" | sha256sum -c -)

echo "data file for the checks:"
"$PY" bench/device_check.py prepare "$DATA"

# What travels with every call: tracked files and untracked ones git does not ignore (shared/ included,
# when the checkout has one and git does not ignore it).
tree=$(git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, sys
names = set(sys.stdin.buffer.read().split(b"\0")) - {b""}
print(sum(os.lstat(n).st_size for n in names if os.path.lexists(n)))')
extras=$(( $(stat -c %s "$DIR/$LGB_WHEEL") + $(stat -c %s "$DATA") + 4096 ))
wheel=$(stat -c %s "$DIR/$ORT_WHEEL")
room=$((LIMIT - tree - MARGIN))  # for carried files, per call
[ "$room" -gt "$MAX_PART" ] || MAX_PART=$room
# the fewest calls: parts as big as a call takes, the last call carrying the remainder, the lightgbm wheel
# and the data file (n = ceil((wheel + extras) / room))
part=$((MAX_PART / 65536 * 65536))
if [ $((room - extras)) -lt $((4 * MIB)) ]; then
    echo "the working tree that travels is $((tree / MIB)) MiB: too little room left for wheel parts" >&2
    exit 1
fi
n=$(( (wheel + part - 1) / part ))
last=$((wheel - (n - 1) * part))
[ $((last + extras)) -le "$room" ] || n=$((n + 1))  # remainder and extras do not fit together: one more
if [ $((last + extras)) -gt "$room" ]; then
    part=$(( ((wheel + n - 1) / n + 65535) / 65536 * 65536 ))  # spread over n, last one the smallest
    last=$((wheel - (n - 1) * part))
fi
if [ $((last + extras)) -gt "$room" ] || [ "$part" -gt "$room" ]; then
    echo "no split found that fits $((room / 1024)) KiB a call" >&2
    exit 1
fi

rm -f "$PREFIX"* "$MANIFEST"
split -b "$part" -d -a 2 "$DIR/$ORT_WHEEL" "$PREFIX"
(cd "$DIR" && sha256sum ort-gpu.part-* > parts.sha256)
mapfile -t parts < <(cd "$DIR" && ls ort-gpu.part-*)
[ "${#parts[@]}" = "$n" ] || { echo "split made ${#parts[@]} parts, expected $n" >&2; exit 1; }

echo
echo "working tree that travels: $((tree / 1024)) KiB; room per call: $((room / 1024)) KiB"
echo "onnxruntime-gpu wheel in $n parts of $((part / 1024)) KiB (last $((last / 1024)) KiB, carried with the"
echo "lightgbm wheel and the data file, $((extras / 1024)) KiB)"
echo "onnxruntime-gpu $ORT_VERSION sha256 $ORT_SHA256"
echo
echo "Device calls (device tool 'run'), back to back: a machine stays warm only 30 s after a call, and a"
echo "fresh one has lost the parts (then start again at call 1). Each call's reply lists what it holds."
calls=0
show() {  # COMMAND TIMEOUT CARRY...
    local command=$1 timeout=$2
    shift 2
    calls=$((calls + 1))
    local carry
    carry=$(printf '"%s", ' "$@")
    echo "  call $calls: command: $command"
    echo "          timeout_s: $timeout   carry: [${carry%, }]"
}
for ((i = 0; i < n - 1; i++)); do
    show "bash bench/device_check.sh --receive" 120 "$DIR/${parts[i]}" "$MANIFEST"
done
show "bash bench/device_check.sh --receive --run" 330 "$DIR/${parts[n - 1]}" "$MANIFEST" "$DIR/$LGB_WHEEL" "$DATA"
echo
echo "The last call prints PASS / FAIL lines and RESULT:, and leaves summary.txt, throughput.txt,"
echo "placement.txt, profile.json and device_check.log under \$OUT. Then give the machine back."
