#!/usr/bin/env bash
# The GPU checks, in one call on a lent CUDA machine (README, "Development"), in under 8 minutes:
#   env        the card, torch, and the installed package checked against this checkout;
#   tests      the CUDA tests (tests/collector/test_cuda*.py, marker cuda);
#   sanitizer  the race, staging and hook tests again under TORCH_CUDA_SANITIZER=1, on the
#              eager _foreach_norm pass (pointer_tables=False, no graphs): the sanitizer sees
#              neither a graph replay's reads nor the Triton pass's, whose addresses are data;
#   profile    a profile of capture() and the plan cache's fast path (bench/plan_fast_path.py);
#   bench      the collector benchmark, last, in the time left (it writes its figures at its end).
# Full logs land in $OUT (default ./gpu-out), at most 8 files: what a device call brings back.
# Limits in seconds, from the environment: TOTAL_S (the whole script, 470), TEST_S (200),
# SAN_S (45), PROF_S (35); the benchmark gets what is left of TOTAL_S. PHASES (default
# "tests sanitizer profile bench") picks phases for a rerun; env always runs and stops the
# script where there is no CUDA device (ALLOW_NO_CUDA=1 goes on: a dry run of the plumbing).
#
# Before the call, here:  make gpu-wheels; ../shared/tools/gpu-wheels.sh   (fills .whl/: this
#                         package's wheel, pyzmq, pytest-asyncio; env catches a stale one)
# The call:               carry [".whl"], timeout_s 540, command: bash tools/gpu-check.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-470}
PHASES=${PHASES:-tests sanitizer profile bench}
export PYTHONUNBUFFERED=1
SECONDS=0
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
want() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# pytest as the GPU image has it: no pytest-timeout perhaps (faulthandler dumps a hung test's
# stacks after 60 s; `timeout` ends the run), pytest-asyncio not needed by these tests.
PYTEST=(python3 -P -m pytest -q -ra -p no:cacheprovider -p no:asyncio -m cuda
  -o faulthandler_timeout=60 -W "ignore::pytest.PytestConfigWarning")

# --- env: wheels, the installed package against the checkout, the device -------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 2
else
  echo "no .whl/: build the wheels first (README, Development)" >&2
  exit 2
fi
# A stale wheel of this package would test old code: compare every installed module with the
# checkout (pyproject's package-dir says which folder is which package); where they differ,
# or the wheel is missing, install the checkout's sources over it, say so, and compare again.
check_installed() {
  python3 -P - "$@" <<'PY'
import pathlib, shutil, sys, tomllib
root, site = pathlib.Path.cwd(), pathlib.Path("/tmp/site")
cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
pairs = [(root / cfg["package-dir"][p], site.joinpath(*p.split("."))) for p in cfg["packages"]]
if sys.argv[1:] == ["--overlay"]:
    for src, dst in pairs:
        dst.mkdir(parents=True, exist_ok=True)
        for old in dst.glob("*.py"):
            old.unlink()
        for f in src.glob("*.py"):
            shutil.copy2(f, dst / f.name)
differ = []
for src, dst in pairs:
    for name in sorted({f.name for f in src.glob("*.py")} | {f.name for f in dst.glob("*.py")}):
        a, b = src / name, dst / name
        if not a.exists():
            differ.append(f"{b.relative_to(site)}: installed only")
        elif not b.exists():
            differ.append(f"{a.relative_to(root)}: not installed")
        elif a.read_bytes() != b.read_bytes():
            differ.append(f"{a.relative_to(root)}: differs")
import esper_telemetry
print(f"installed esper_telemetry: {pathlib.Path(esper_telemetry.__file__).parent}")
if differ:
    print(f"installed package differs from the checkout in {len(differ)} files:", *differ[:20], sep="\n  ")
    sys.exit(1)
print("installed package equals the checkout")
PY
}
{
  if ! check_installed; then
    echo "STALE or missing wheel of this package: installing the checkout's sources over it"
    check_installed --overlay || { echo "still differs: stopping"; exit 3; }
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import triton; print('triton', triton.__version__)" || echo "no triton: pointer tables off"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" ||
    [ "${ALLOW_NO_CUDA:-0}" = 1 ] || { echo "no CUDA device: stopping"; exit 3; }
} 2>&1 | tee "$OUT/device.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { note "env: FAILED (see device.txt)"; exit 3; }
note "env: $(grep -E '^python ' "$OUT/device.txt"); $(grep -E '^installed package' "$OUT/device.txt" | tail -n 1)$(grep -q '^STALE' "$OUT/device.txt" && echo ' (the wheel was stale: the checkout'"'"'s sources were installed over it)') ($SECONDS s)"

run_phase() {  # name limit_s log command...
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((TOTAL_S - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then note "$name: skipped, ${left} s left of TOTAL_S"; return; fi
  echo "=== $name (at most ${limit} s) ==="
  timeout -k 5 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  note "$name: exit $rc$([ $rc = 124 ] && echo ' (time limit)'), $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -n 1) (at $SECONDS s)"
}

if want tests; then
  run_phase tests "${TEST_S:-200}" "$OUT/cuda-tests.log" "${PYTEST[@]}" \
    tests/collector/test_cuda.py tests/collector/test_cuda_hazards.py tests/collector/test_cuda_coverage.py
fi
if want sanitizer; then
  run_phase sanitizer "${SAN_S:-45}" "$OUT/sanitizer.log" env TORCH_CUDA_SANITIZER=1 "${PYTEST[@]}" \
    tests/collector/test_cuda.py -k "eager and foreach"
fi
if want profile; then
  run_phase profile "${PROF_S:-35}" "$OUT/profile.txt" bash -c \
    'python3 bench/profile_capture.py && python3 bench/plan_fast_path.py'
fi
if want bench; then
  run_phase bench $((TOTAL_S - SECONDS)) "$OUT/bench.log" python3 bench/collector_overhead.py \
    --attach-runs 3 --results "$OUT/RESULTS.md" --json "$OUT/collector.json"
fi
echo "=== summary ($SECONDS s) ==="
cat "$summary"
