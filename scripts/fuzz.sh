#!/usr/bin/env bash
# The long fuzzing run: every target of `fuzz/` (qscript-fuzz), MINUTES minutes in all (default
# 30), release build, at low priority. Findings land in fuzz/regressions/<target>/ (each a
# regression test from then on, run by `cargo test -p qscript-fuzz`); log the run in
# fuzz/RUNS.md. Extra arguments go to `qscript-fuzz all` (`--seed S`, `--timeout SECS`,
# `--mem-mb MIB`).
#
#   bash scripts/fuzz.sh          # 30 minutes
#   bash scripts/fuzz.sh 60 --seed 7
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
shift || true
nice -n 10 cargo build --release -p qscript-fuzz
# A copy, so a build during the run does not replace the binary under it.
BIN=$(mktemp -d)/qscript-fuzz
cp target/release/qscript-fuzz "$BIN"
echo "$(date -u +%FT%TZ) fuzzing all targets for $MINUTES min on $(nproc) cores ($(uname -m))"
nice -n 10 "$BIN" all --secs "$((MINUTES * 60))" "$@"
