#!/usr/bin/env bash
# `make sdist`: builds the source distribution (dist/lowbit-<version>.tar.gz) and proves that
# it builds from scratch: unpacked in a temporary directory, outside the source tree, a wheel is
# built from it with pip in an isolated build environment (build requirements from
# pyproject.toml only, a fresh CMake build directory), and that wheel passes the smoke test in
# a fresh environment (scripts/build_wheel.sh WHEEL).
#
#   scripts/build_sdist.sh            (SMOKE=0 skips the smoke test of the rebuilt wheel)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PY=$VENV/bin/python
DIST=$ROOT/dist
fail() { echo "sdist: $*" >&2; exit 1; }
[[ -x $PY ]] || fail "$PY not found: run 'make setup' first"
mkdir -p "$DIST"
rm -f "$DIST"/lowbit-*.tar.gz

# ---- the sdist: scikit-build-core's PEP 517 hook ------------------------------------------------
SDIST=$("$PY" -c 'import sys; from scikit_build_core.build import build_sdist; print(build_sdist(sys.argv[1]))' "$DIST" | tail -1)
SDIST=$DIST/$SDIST
[[ -f $SDIST ]] || fail "no sdist written"
"$PY" - "$SDIST" <<'EOF'
import sys, tarfile
names = tarfile.open(sys.argv[1]).getnames()
root = names[0].split("/")[0]
rel = {n[len(root) + 1:] for n in names if "/" in n}
need = ["pyproject.toml", "CMakeLists.txt", "README.md", "python/lowbit/__init__.py", "kernels/__init__.py",
        "csrc/bindings.cpp", "csrc/api.cpp", "csrc/kernels/generic/gemm.cpp", "csrc/kernels/neon/gemm.cpp",
        "csrc/tests/test_kernels.cpp", "tests/conftest.py", "scripts/smoke_wheel.py"]
missing = [n for n in need if n not in rel]
junk = sorted({n.split("/")[0] for n in rel if n.split("/")[0] in (".venv", "build", "dist", ".git")})
if missing or junk:
    sys.exit(f"sdist {sys.argv[1]}: missing {missing}, must not contain {junk}")
print(f"sdist: {sys.argv[1].rsplit('/', 1)[-1]}: {len(rel)} files")
EOF

# ---- a wheel from the unpacked sdist, from scratch ----------------------------------------------
TMP=$(mktemp -d /tmp/lowbit-sdist.XXXXXX)
[[ ${KEEP_TMP:-0} == 1 ]] || trap 'rm -rf "$TMP"' EXIT
tar -xzf "$SDIST" -C "$TMP"
SRC=$(ls -d "$TMP"/lowbit-*/)
t0=$SECONDS
LOG=$TMP/wheel.log
# an isolated build environment: only what pyproject.toml's [build-system] asks for (from pip's
# configured indexes / cache); pybind11 from there, cmake/ninja from PATH or as packages
mode=isolated
if ! (cd "$TMP" && "$PY" -m pip wheel --no-deps -w "$TMP/wheel" "$SRC") >"$LOG" 2>&1; then
  if grep -qiE 'could not find a version|no matching distribution|connection|network' "$LOG"; then
    mode="no-build-isolation (the isolated build could not fetch its requirements)"
    (cd "$TMP" && "$PY" -m pip wheel --no-deps --no-build-isolation -w "$TMP/wheel" "$SRC") >>"$LOG" 2>&1 \
      || { tail -30 "$LOG" >&2; fail "building a wheel from the sdist failed (log kept: $LOG)"; }
  else
    tail -30 "$LOG" >&2
    trap - EXIT
    fail "building a wheel from the sdist failed (log kept: $LOG)"
  fi
fi
WHEEL=$(ls "$TMP"/wheel/lowbit-*.whl)
echo "sdist: built $(basename "$WHEEL") from the unpacked sdist in $((SECONDS - t0)) s ($mode build)"
if [[ ${SMOKE:-1} == 1 ]]; then
  bash "$ROOT/scripts/build_wheel.sh" "$WHEEL"
fi
echo "sdist: OK $SDIST"
