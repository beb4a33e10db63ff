#!/usr/bin/env bash
# A local Debian base image with Python, for building kubetune's images where no registry is reachable:
#   sudo scripts/local-base-image.sh [TAG]     (default kubetune/base:bookworm)
# then: docker build --build-arg BASE_IMAGE=kubetune/base:bookworm -f Dockerfile.trainer .
set -euo pipefail
tag=${1:-kubetune/base:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["python3"]' - "$tag"
echo "$tag"
