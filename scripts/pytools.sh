# Sourced by the CI legs that need scripts/requirements-tools.txt: (re)creates
# target/pytools when the requirements change and puts it first on PATH.
# Returns non-zero (the caller prints its SKIPPED banner) if pip cannot install.
# Also mfx_version, the package version the wheel legs check.
pytools_env() {
  local venv=target/pytools req=scripts/requirements-tools.txt want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "installing $req into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" &&
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" &&
      echo "$want" >"$venv/.requirements.sha256" || return 1
  fi
  export PATH="$PWD/$venv/bin:$PATH"
}

# The mfx package's version (the wheels' file names and `mfx --version`).
mfx_version() {
  cargo metadata --locked --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "mfx"))'
}
