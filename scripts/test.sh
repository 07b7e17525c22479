#!/usr/bin/env bash
# Installs what the whole test suite needs (QEMU, gcc, binutils and gdb from Debian when run as root;
# windump with its test and docs extras in .venv) and runs it; arguments go to pytest, which lists
# every skipped or failed test in its summary.
# pytest's "no tests ran" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
command -v gcc >/dev/null || packages+=(gcc)
command -v objcopy >/dev/null || packages+=(binutils)
command -v gdb >/dev/null || packages+=(gdb)
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "test.sh: installing ${packages[*]}" >&2
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
    else
        echo "test.sh: warning: missing ${packages[*]} (run as root to install them); tests that need them skip" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,docs]'

# A 4 GiB guest's reference dump, ELF and our dump put the run's peak near 12 GiB of temporary
# files (each is deleted once compared): say so up front when the disk cannot hold them.
temp=$(.venv/bin/python -c 'import tempfile; print(tempfile.gettempdir())')
free_gib=$(( $(df -Pk "$temp" | awk 'NR == 2 { print $4 }') / 1048576 ))
if [ "$free_gib" -lt 16 ]; then
    echo "test.sh: warning: only $free_gib GiB free in $temp; the QEMU tests need about 12 GiB" >&2
fi

# -ra: the summary names every test that did not pass, skips included (under CI a skip fails).
status=0
.venv/bin/python -m pytest -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
