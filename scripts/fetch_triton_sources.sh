#!/usr/bin/env bash
# Assemble a TRITON_SOURCES folder on a machine that reaches GitHub, for building Triton's
# onnxruntime backend on one that does not (make triton-sources).
#
#   scripts/fetch_triton_sources.sh DIR        (DIR must not exist yet)
#
# DIR gets the layout of ../shared/vendor: one archive per pinned source, each fetched by
# its commit (git checks the content against the commit id) and unpacking to one folder
# named after its repository, the ONNX Runtime header checked against its pinned SHA-256,
# and SHA256SUMS over all of them. Carry DIR over as it is, then on the offline machine:
#   TRITON_SOURCES=DIR make run
# Needs git, curl and sha256sum. The archives' checksums are this folder's own (gzip output
# differs between git versions); the pins are the commits in scripts/triton_pins.sh.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
DEST=$(realpath -m "$1")
die() { echo "fetch_triton_sources: $*" >&2; exit "${2:-1}"; }
[[ ! -e $DEST ]] || die "$DEST exists: give a new folder" 2
source "$(dirname "$0")/triton_pins.sh"

# Built beside DEST and renamed: DEST appears complete or not at all.
mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d "$(dirname "$DEST")/.triton-sources.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
for archive in $(source_archives); do
    read -r url commit <<<"$(source_url "$archive")"
    name=$(basename "$archive")
    echo "fetching $url at $commit"
    fetch_git "$WORK/git/$name" "$url" "$commit" || die "cannot fetch $url at $commit"
    mkdir -p "$WORK/out/$(dirname "$archive")"
    git -C "$WORK/git/$name" archive --format=tar.gz --prefix="$name/" \
        -o "$WORK/out/$archive.tar.gz" FETCH_HEAD
done
mkdir -p "$WORK/out/$(dirname "$ORT_HEADER_PATH")"
curl -fsSL -o "$WORK/out/$ORT_HEADER_PATH" "$ORT_HEADER_URL" || die "cannot fetch $ORT_HEADER_URL"
echo "$ORT_HEADER_SHA256  $WORK/out/$ORT_HEADER_PATH" | sha256sum --quiet -c \
    || die "$ORT_HEADER_URL does not match its pinned checksum"
(cd "$WORK/out" && find . -type f ! -name SHA256SUMS -printf '%P\n' | sort | xargs sha256sum \
    >SHA256SUMS)
mv "$WORK/out" "$DEST"
echo "TRITON_SOURCES folder ready: $DEST (carry it over whole; SHA256SUMS checks it there)"
