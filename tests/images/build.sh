#!/usr/bin/env bash
# Builds the busybox test image the docker-marked tests deploy. Needs busybox-static and a
# running engine; nothing is pulled (the image is FROM scratch).
set -euo pipefail
tag=${1:-deploy-agent-test/httpd:1}
here=$(cd "$(dirname "$0")" && pwd)
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp -r "$here/httpd/." "$context/"
cp "$(command -v busybox)" "$context/busybox"
docker build -q -t "$tag" "$context" >/dev/null
echo "built $tag"
