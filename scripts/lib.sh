# Shared by scripts/*: a venv installed from requirements.lock, with uv (the version the lock pins) doing the work.
# uv rather than pip-tools: one tool compiles the lock, installs it in seconds, and resolves the lowest versions
# the ranges allow (--resolution lowest-direct) for scripts/test-lowest.

# ensure_uv: make .venv if missing and put the lock's uv in it; sets UV.
ensure_uv() {
  local want
  want="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements.lock)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  if [ ! -x .venv/bin/uv ] || [ "$(.venv/bin/uv --version | cut -d' ' -f2)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "uv==${want}"
  fi
  UV="$PWD/.venv/bin/uv"
}

# Every install compiles its bytecode: these machines set PYTHONDONTWRITEBYTECODE, so a package without its .pyc
# files is compiled again by every process that imports it (a server start costs 2.6 s of CPU instead of 1.2 s).
# compile_tree: the same for the tree's own package, which an editable install leaves in place.
compile_tree() {
  "$1/bin/python" -m compileall -q -j 0 server >/dev/null
}

# sync_venv DIR: DIR holds exactly what requirements.lock pins (hashes checked).
sync_venv() {
  [ -x "$1/bin/python" ] || "$UV" venv --quiet --python python3.11 "$1"
  "$UV" pip sync --quiet --compile-bytecode --python "$1/bin/python" --require-hashes requirements.lock
}

# ensure_dev_venv: .venv from the lock, with the tree installed editable (no dependencies of its own).
ensure_dev_venv() {
  ensure_uv
  sync_venv .venv
  "$UV" pip install --quiet --python .venv/bin/python --no-deps -e .
  compile_tree .venv
}
