#!/usr/bin/env bash
# Type-check the package with the pinned mypy (a test dependency): zero errors required.
# pyproject maps the top-level folders onto one namespace (edgesplit.runtime = runtime/, ...), so the
# check runs over a temporary tree of symbolic links laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
mkdir "$TREE/edgesplit"
for f in edgesplit/*.py; do ln -s "$ROOT/$f" "$TREE/edgesplit/"; done
ln -s "$ROOT/edgesplit/harness" "$TREE/edgesplit/harness"
for d in runtime device cloud transport profiles firmware_configs; do ln -s "$ROOT/$d" "$TREE/edgesplit/$d"; done
cd "$TREE"
"$ROOT/.venv/bin/python" -m mypy --config-file "$ROOT/pyproject.toml" -p edgesplit
