#!/usr/bin/env bash
# Refresh the niivue bundle the browser page ships (server/web/vendor/niivue/) from npm.
#
#   scripts/update_niivue.sh [VERSION]     # default: the version pinned in VERSION
#
# Installs @niivue/niivue@VERSION with npm into a temporary folder (no install scripts run) and
# copies its self-contained ES module build (dist/index.js: niivue with its dependencies bundled)
# as niivue.js, the licence of every package bundled in it (read from the build's metafile) under
# licenses/, and writes VERSION (version, npm integrity, sha256 of niivue.js). niivue's tarball
# carries no licence file: LICENSE beside this bundle is niivue's BSD-2-Clause text from its
# repository, and this script refuses a version whose package.json names another licence.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/server/web/vendor/niivue"
version="${1:-$(sed -n 's/^version: //p' "$dest/VERSION")}"
if [[ -z "$version" ]]; then
    echo "usage: $0 VERSION (no version pinned in $dest/VERSION)" >&2
    exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
npm install --prefix "$work" --ignore-scripts --no-audit --no-fund --no-package-lock \
    --silent "@niivue/niivue@$version"
pkg="$work/node_modules/@niivue/niivue"

licence="$(node -p "require('$pkg/package.json').license")"
if [[ "$licence" != "BSD-2-Clause" ]]; then
    echo "@niivue/niivue@$version is licensed '$licence', not BSD-2-Clause: review it first" >&2
    exit 1
fi
integrity="$(npm view "@niivue/niivue@$version" dist.integrity)"

# The ES module without its source-map comment (the map is not shipped).
sed '/^\/\/# sourceMappingURL=/d' "$pkg/dist/index.js" >"$work/niivue.js"

# Packages bundled into dist/index.js, from esbuild's metafile of that build.
bundled="$(node -e '
const meta = require(process.argv[1]);
const names = new Set();
for (const input of Object.keys(meta.outputs["dist/index.js"].inputs)) {
  const m = input.match(/node_modules\/((?:@[^/]+\/)?[^/]+)/);
  if (m) names.add(m[1]);
}
console.log([...names].sort().join("\n"));
' "$pkg/dist/metafile-esm.json")"

rm -rf "$dest/licenses"
mkdir -p "$dest/licenses"
notes=""
while read -r name; do
    [[ -z "$name" ]] && continue
    manifest="$(find "$work/node_modules" -path "*node_modules/$name/package.json" | head -n 1)"
    if [[ -z "$manifest" ]]; then
        echo "bundled package $name not found in the npm install" >&2
        exit 1
    fi
    dir="$(dirname "$manifest")"
    meta="$(node -p "const p = require('$manifest'); p.version + ' ' + p.license")"
    file="$(find "$dir" -maxdepth 1 -iname 'licen[cs]e*' | head -n 1)"
    if [[ -n "$file" ]]; then
        cp "$file" "$dest/licenses/${name//\//__}.txt"
    fi
    notes+="  $name $meta"$'\n'
done <<<"$bundled"

cp "$work/niivue.js" "$dest/niivue.js"
{
    echo "package: @niivue/niivue"
    echo "version: $version"
    echo "licence: $licence (LICENSE)"
    echo "npm integrity: $integrity"
    echo "niivue.js: dist/index.js of the package, source-map comment removed"
    echo "niivue.js sha256: $(sha256sum "$dest/niivue.js" | cut -d' ' -f1)"
    echo "packages bundled in niivue.js (name, version npm resolved when vendoring, licence;"
    echo "licence texts under licenses/):"
    printf '%s' "$notes"
    echo "updated by: scripts/update_niivue.sh $version"
} >"$dest/VERSION"
echo "vendored @niivue/niivue@$version into $dest"
