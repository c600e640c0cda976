#!/usr/bin/env bash
# Type-checks gradwatch as users install it. The distribution stitches src/gradwatch, agent/, server/ and
# proto/gradwatch/v1 into one namespace with setuptools' package-dir, which mypy cannot follow (it would resolve
# every gradwatch.agent.* and gradwatch.server.* import to Any). So this builds the installed layout as a tree
# of symlinks in a temporary folder and checks the package there; paths in the output are mapped back to the
# repository's folders. Settings come from [tool.mypy] in pyproject.toml.
#
#     scripts/typecheck.sh [extra mypy arguments]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mypy="${MYPY:-$root/.venv/bin/mypy}"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/gradwatch"
for entry in "$root"/src/gradwatch/*; do
    ln -s "$entry" "$tree/gradwatch/"
done
ln -s "$root/agent" "$tree/gradwatch/agent"
ln -s "$root/server" "$tree/gradwatch/server"
ln -s "$root/proto/gradwatch/v1" "$tree/gradwatch/v1"
cd "$tree"
status=0
"$mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" -p gradwatch "$@" >"$tree/out" 2>&1 \
    || status=$?
sed -e 's#^gradwatch/agent/#agent/#' -e 's#^gradwatch/server/#server/#' -e 's#^gradwatch/v1/#proto/gradwatch/v1/#' \
    -e 's#^gradwatch/#src/gradwatch/#' "$tree/out"
exit "$status"
