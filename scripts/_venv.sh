# shellcheck shell=bash
# Sourced by scripts/test and scripts/up (from the repository root): make sure .venv exists
# and holds this project installed editable with its dev extras.
#
# Needs only python3.11+ with venv and pip. PYTHON=/path/to/python overrides the interpreter.
# The install is skipped while pyproject.toml is unchanged since the last successful one
# (stamp in .venv/); delete .venv/.installed-pyproject.sha256 to force it.

ensure_venv() {
    local python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
    fi
    if [[ ! -x .venv/bin/python ]]; then
        echo "==> creating .venv with $("$python" --version 2>&1)"
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
            echo "error: $python is older than 3.11; set PYTHON=/path/to/python3.11" >&2
            return 1
        }
        "$python" -m venv .venv
    fi

    local stamp=.venv/.installed-pyproject.sha256 wanted
    wanted="$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        echo "==> .venv is up to date with pyproject.toml"
        return 0
    fi
    echo "==> installing the project into .venv (pip install -e '.[dev]')"
    # --quiet hides progress only; pip still prints errors, and a failure stops the caller.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$wanted" >"$stamp"
}
