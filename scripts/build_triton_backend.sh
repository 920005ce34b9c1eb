#!/usr/bin/env bash
# Build Triton's ONNX Runtime backend (release r24.10, CPU only) for the tritonserver 2.51
# bundled in the nvidia-pytriton wheel, against ONNX Runtime 1.19.2: the runtime of the
# cluster's tritonserver:24.10-py3 image, so that local and cluster serving run the same one.
#
#   scripts/build_triton_backend.sh [DEST]        (default .venv/triton-backends)
#
# Produces DEST/onnxruntime/{libtriton_onnxruntime.so, libonnxruntime.so*, libtritonserver.so}
# and skips the build when DEST/onnxruntime/.pins matches the pins below.
#
# Sources: with TRITON_SOURCES=DIR, the archives in DIR (layout and SHA256SUMS as in
# ../shared/vendor; scripts/fetch_triton_sources.sh assembles one), checked against
# DIR/SHA256SUMS; otherwise fetched with git from GitHub at the pinned commits. The GitHub
# path needs a connected machine: it could not be exercised where this was written
# (registries only), unlike the TRITON_SOURCES path.
# Needs only g++ from the system: cmake is the system's, else installed from PyPI into
# PYTHON's venv; RapidJSON and GoogleTest are built from their pinned sources, never taken
# from the system (rapidjson-dev, googletest), so the result does not depend on what is
# installed. PYTHON (default .venv/bin/python) is the venv with nvidia-pytriton; its pip
# downloads the onnxruntime wheel.
set -euo pipefail

DEST=$(realpath -m "${1:-.venv/triton-backends}")
PYTHON=${PYTHON:-.venv/bin/python}
ORT_VERSION=1.19.2
# The commits, the header and their checksums: scripts/triton_pins.sh.
source "$(dirname "$0")/triton_pins.sh"

die() { echo "build_triton_backend: $*" >&2; exit 2; }

OUT=$DEST/onnxruntime
PINS="triton r24.10 ${COMMITS[*]} rapidjson $RAPIDJSON_COMMIT googletest $GTEST_COMMIT onnxruntime $ORT_VERSION header $ORT_HEADER_SHA256 gpu OFF"
if [[ -f $OUT/.pins && "$(cat "$OUT/.pins")" == "$PINS" && -f $OUT/libtriton_onnxruntime.so
      && -e $OUT/libtritonserver.so ]]; then
    echo "Triton onnxruntime backend up to date: $OUT"
    exit 0
fi

command -v g++ >/dev/null || die "no C++ compiler: install g++ (Debian: apt-get install g++)"
"$PYTHON" -c 'import pytriton' 2>/dev/null || die "$PYTHON has no nvidia-pytriton: make .venv/bin/.installed"
CMAKE=$(command -v cmake || true)
if [[ -z $CMAKE ]]; then
    CMAKE=$(dirname "$PYTHON")/cmake
    [[ -x $CMAKE ]] || "$PYTHON" -m pip install --quiet cmake || die "no cmake: apt-get install cmake"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/triton-backend-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" "$WORK/include" "$WORK/ort"

echo "Triton onnxruntime backend: unpacking sources"
if [[ -n ${TRITON_SOURCES:-} ]]; then
    [[ -f $TRITON_SOURCES/SHA256SUMS ]] || die "TRITON_SOURCES=$TRITON_SOURCES has no SHA256SUMS"
    (cd "$TRITON_SOURCES" && sha256sum --quiet -c SHA256SUMS) \
        || die "archives in $TRITON_SOURCES do not match its SHA256SUMS"
    for archive in $(source_archives); do
        # Only checksummed files are used: an archive missing from SHA256SUMS is refused.
        grep -q "  $archive.tar.gz\$" "$TRITON_SOURCES/SHA256SUMS" \
            || die "$TRITON_SOURCES/SHA256SUMS does not list $archive.tar.gz"
        tar -xzf "$TRITON_SOURCES/$archive.tar.gz" -C "$WORK/src"
    done
    cp "$TRITON_SOURCES/$ORT_HEADER_PATH" "$WORK/include/"
else
    for archive in $(source_archives); do
        read -r url commit <<<"$(source_url "$archive")"
        fetch_git "$WORK/src/$(basename "$archive")" "$url" "$commit" \
            || die "cannot fetch $url at $commit (offline? set TRITON_SOURCES: see the README)"
    done
    curl -fsSL -o "$WORK/include/onnxruntime_c_api.h" "$ORT_HEADER_URL" \
        || die "cannot fetch onnxruntime_c_api.h (offline? set TRITON_SOURCES)"
fi
echo "$ORT_HEADER_SHA256  $WORK/include/onnxruntime_c_api.h" | sha256sum --quiet -c \
    || die "onnxruntime_c_api.h does not match its pinned checksum"

# Only the wheel's library is needed, not an install: the project's venv keeps its own
# onnxruntime for export and benchmarks.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    "onnxruntime==$ORT_VERSION" -d "$WORK/ort" \
    || die "cannot download the onnxruntime==$ORT_VERSION wheel"
"$PYTHON" - "$WORK/ort" "$ORT_VERSION" <<'EOF'
import sys, zipfile, pathlib
folder, version = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(folder.glob("onnxruntime-*.whl"))
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
(folder / "lib").mkdir()
(folder / "lib" / pathlib.Path(name).name).write_bytes(zipfile.ZipFile(wheel).read(name))
EOF
ln -s "libonnxruntime.so.$ORT_VERSION" "$WORK/ort/lib/libonnxruntime.so.1"
ln -s "libonnxruntime.so.$ORT_VERSION" "$WORK/ort/lib/libonnxruntime.so"

echo "Triton onnxruntime backend: installing RapidJSON headers (seconds)"
"$CMAKE" -S "$WORK/src/rapidjson" -B "$WORK/rapidjson-build" -DRAPIDJSON_BUILD_DOC=OFF \
    -DRAPIDJSON_BUILD_EXAMPLES=OFF -DRAPIDJSON_BUILD_TESTS=OFF \
    -DCMAKE_INSTALL_PREFIX="$WORK/rapidjson" >"$WORK/rapidjson.log" 2>&1 \
    && "$CMAKE" --install "$WORK/rapidjson-build" >>"$WORK/rapidjson.log" 2>&1 \
    || { tail -30 "$WORK/rapidjson.log" >&2; die "RapidJSON install failed"; }

echo "Triton onnxruntime backend: building (about 1.5 minutes on 2 cores)"
# RapidJSON's config sets RapidJSON_INCLUDE_DIRS, `common` reads RAPIDJSON_INCLUDE_DIRS (the
# spelling of the 1.1.0 config distributions ship): without the second, the build fails at
# rapidjson/document.h. Fully disconnected: every source is already here, nothing may be
# fetched behind our back, and nothing comes from the system's packages.
"$CMAKE" -S "$WORK/src/onnxruntime_backend" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DTRITON_ENABLE_GPU=OFF -DTRITON_CORE_HEADERS_ONLY=ON \
    -DTRITON_ONNXRUNTIME_INCLUDE_PATHS="$WORK/include" \
    -DTRITON_ONNXRUNTIME_LIB_PATHS="$WORK/ort/lib" \
    -DFETCHCONTENT_FULLY_DISCONNECTED=ON \
    -DFETCHCONTENT_SOURCE_DIR_REPO-COMMON="$WORK/src/common" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-CORE="$WORK/src/core" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND="$WORK/src/backend" \
    -DFETCHCONTENT_SOURCE_DIR_GOOGLETEST="$WORK/src/googletest" \
    -DRapidJSON_DIR="$WORK/rapidjson/lib/cmake/RapidJSON" \
    -DRAPIDJSON_INCLUDE_DIRS="$WORK/rapidjson/include" \
    >"$WORK/cmake.log" 2>&1 || { tail -30 "$WORK/cmake.log" >&2; die "cmake configure failed"; }
"$CMAKE" --build "$WORK/build" --target triton-onnxruntime-backend -j "$(nproc)" \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; die "build failed"; }

# The backend is linked against libtritonserver.so (its RPATH is $ORIGIN); the wheel
# ships that library under a hashed name.
SERVER_LIB=$("$PYTHON" - <<'EOF'
import pathlib, pytriton
libs = pathlib.Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
print(next(libs.glob("libtritonserver*.so*")))
EOF
)
rm -rf "$OUT.new"
mkdir -p "$OUT.new"
cp "$WORK/build/libtriton_onnxruntime.so" "$WORK/ort/lib/libonnxruntime.so.$ORT_VERSION" "$OUT.new/"
cp -P "$WORK/ort/lib/libonnxruntime.so.1" "$WORK/ort/lib/libonnxruntime.so" "$OUT.new/"
ln -s "$SERVER_LIB" "$OUT.new/libtritonserver.so"
echo "$PINS" >"$OUT.new/.pins"
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
echo "Triton onnxruntime backend built: $OUT"
