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
# ../shared/vendor), checked against DIR/SHA256SUMS; otherwise fetched with git from GitHub
# at the pinned commits. The GitHub path needs a connected machine: it could not be
# exercised where this was written (registries only), unlike the TRITON_SOURCES path.
# Needs: g++; cmake (the system's, else installed from PyPI into PYTHON's venv); rapidjson
# headers (Debian: rapidjson-dev); googletest sources, which Triton's `common` configures
# but never compiles (Debian: googletest; else CMake fetches them from GitHub). PYTHON
# (default .venv/bin/python) is the venv with nvidia-pytriton; its pip downloads the
# onnxruntime wheel.
set -euo pipefail

DEST=$(realpath -m "${1:-.venv/triton-backends}")
PYTHON=${PYTHON:-.venv/bin/python}
ORT_VERSION=1.19.2
ORT_HEADER_URL=https://raw.githubusercontent.com/microsoft/onnxruntime/v1.19.0/include/onnxruntime/core/session/onnxruntime_c_api.h
ORT_HEADER_SHA256=bfdb387ef6f576ccbeb18c63e19fe5854aa0c278a3838027e9f764419e61475e
declare -A COMMITS=(
    [onnxruntime_backend]=17e5cb23a6fbeb37282eb7079dd0b580cd79530d
    [backend]=ac03a5d97403dec841ad46d0439e93db12c9268f
    [core]=bfec7c61dc0939433f64f14e89b1973073eac8ba
    [common]=578491fc3944f77d16a6a38e3d7691c485c47ba0
)
GTEST_SRC=${GTEST_SRC:-/usr/src/googletest}

die() { echo "build_triton_backend: $*" >&2; exit 2; }

OUT=$DEST/onnxruntime
PINS="triton r24.10 ${COMMITS[*]} onnxruntime $ORT_VERSION header $ORT_HEADER_SHA256 gpu OFF"
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
[[ -f /usr/include/rapidjson/rapidjson.h ]] || die "no rapidjson headers: apt-get install rapidjson-dev"
# With local sources nothing may be fetched: a missing piece fails the configure step.
FETCH_ARGS=()
[[ -z ${TRITON_SOURCES:-} ]] || FETCH_ARGS=(-DFETCHCONTENT_FULLY_DISCONNECTED=ON)
if [[ -f $GTEST_SRC/CMakeLists.txt ]]; then
    FETCH_ARGS+=(-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST="$GTEST_SRC")
elif [[ -n ${TRITON_SOURCES:-} ]]; then
    die "no googletest sources in $GTEST_SRC: apt-get install googletest (or set GTEST_SRC)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/triton-backend-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" "$WORK/include" "$WORK/ort"

echo "Triton onnxruntime backend: unpacking sources"
if [[ -n ${TRITON_SOURCES:-} ]]; then
    [[ -f $TRITON_SOURCES/SHA256SUMS ]] || die "TRITON_SOURCES=$TRITON_SOURCES has no SHA256SUMS"
    (cd "$TRITON_SOURCES" && sha256sum --quiet -c SHA256SUMS) \
        || die "archives in $TRITON_SOURCES do not match its SHA256SUMS"
    for repo in "${!COMMITS[@]}"; do
        tar -xzf "$TRITON_SOURCES/triton-r24.10/$repo.tar.gz" -C "$WORK/src"
    done
    cp "$TRITON_SOURCES/onnxruntime-1.19.0/include/onnxruntime_c_api.h" "$WORK/include/"
else
    # Fetched by commit id: git checks the content against it.
    for repo in "${!COMMITS[@]}"; do
        git -C "$WORK/src" init --quiet "$repo"
        git -C "$WORK/src/$repo" fetch --quiet --depth 1 \
            "https://github.com/triton-inference-server/$repo" "${COMMITS[$repo]}" \
            || die "cannot fetch $repo at ${COMMITS[$repo]} from GitHub (offline? set TRITON_SOURCES)"
        git -C "$WORK/src/$repo" checkout --quiet FETCH_HEAD
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

echo "Triton onnxruntime backend: building (about a minute on 2 cores)"
"$CMAKE" -S "$WORK/src/onnxruntime_backend" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DTRITON_ENABLE_GPU=OFF -DTRITON_CORE_HEADERS_ONLY=ON \
    -DTRITON_ONNXRUNTIME_INCLUDE_PATHS="$WORK/include" \
    -DTRITON_ONNXRUNTIME_LIB_PATHS="$WORK/ort/lib" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-COMMON="$WORK/src/common" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-CORE="$WORK/src/core" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND="$WORK/src/backend" \
    "${FETCH_ARGS[@]}" \
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
