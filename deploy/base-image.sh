#!/usr/bin/env bash
# deploy/base-image.sh [TAG]      (as root; needs the Debian packages debootstrap and docker.io)
#
# A Python 3.11 base image built from Debian bookworm's packages, for a site where no image
# registry is reachable (air-gapped, or behind a proxy that passes Debian's mirror and PyPI only):
# python:3.11-slim cannot be pulled there. Build the images on it with
#   BASE_IMAGE=mtft-base:bookworm make images
# (`make images` runs this itself when python:3.11-slim is neither present nor pullable).
# DEBIAN_MIRROR names the mirror (default: the first one apt uses here, else deb.debian.org);
# the image's apt reads the same mirror, so the Dockerfile's apt-get steps work where this did.
set -euo pipefail

tag=${1:-mtft-base:bookworm}
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
           | sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\(http[^ ]*\).*/\2/p' \
           | grep -v security | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
# minbase: dpkg, apt and the essential tools; python3-venv: the images install into a venv
# (Debian marks its system Python externally managed); passwd: useradd for the non-root user.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$tag"
echo "base image $tag: Debian bookworm from $mirror, $(docker run --rm --network none "$tag" python3 --version)"
