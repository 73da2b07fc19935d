#!/usr/bin/env bash
# Put onnxruntime's C API header where runtime/kernels.py looks for it (the cache, or $1), so
# edgesplit can build its Q4Linear operator. The onnxruntime wheel ships no headers; Debian's
# libonnxruntime-dev package does (85 kB, pinned by checksum). The header is architecture-neutral.
set -euo pipefail
VERSION=1.21.0
DEB=libonnxruntime-dev_${VERSION}+dfsg-1_amd64.deb
URL="${EDGESPLIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}/pool/main/o/onnxruntime/$DEB"
SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
CACHE="${EDGESPLIT_CACHE:-$HOME/.cache/edgesplit}"
DEST="${1:-$CACHE/onnxruntime-headers/$VERSION}"
if [ -f "$DEST/onnxruntime_c_api.h" ]; then
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$URL" "$work/$DEB" <<'PY'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PY
echo "$SHA256  $work/$DEB" | sha256sum --check --quiet - || { echo "ort_headers.sh: $URL does not match sha256 $SHA256" >&2; exit 1; }
(cd "$work" && ar x "$DEB" && mkdir root && tar -xf data.tar.* -C root)
mkdir -p "$(dirname "$DEST")"
staged="$(mktemp -d "$(dirname "$DEST")/.staging.XXXXXX")"
cp "$work"/root/usr/include/onnxruntime/*.h "$staged/"
mv -T "$staged" "$DEST"
echo "onnxruntime $VERSION C API headers in $DEST"
