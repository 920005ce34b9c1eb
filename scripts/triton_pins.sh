# The pinned sources of Triton's onnxruntime backend build, sourced by
# build_triton_backend.sh (which builds them) and fetch_triton_sources.sh (which assembles
# them into a TRITON_SOURCES folder for machines without GitHub).
# shellcheck shell=bash disable=SC2034

# r24.10: the Triton release of the tritonserver 2.51 in the nvidia-pytriton wheel and of
# the cluster's tritonserver:24.10-py3 image.
declare -A COMMITS=(
    [onnxruntime_backend]=17e5cb23a6fbeb37282eb7079dd0b580cd79530d
    [backend]=ac03a5d97403dec841ad46d0439e93db12c9268f
    [core]=bfec7c61dc0939433f64f14e89b1973073eac8ba
    [common]=578491fc3944f77d16a6a38e3d7691c485c47ba0
)
# Triton's `common` finds RapidJSON with find_package and always configures its tests, which
# fetch GoogleTest: the commit its src/test/CMakeLists.txt pins (configured, never compiled).
RAPIDJSON_COMMIT=24b5e7a8b27f42fa16b96fc70aade9106cf7102f
GTEST_COMMIT=9406a60c7839052e4944ea4dbc8344762a89f9bd
# The ONNX Runtime C API header of 1.19, the runtime of the tritonserver:24.10-py3 image.
ORT_HEADER_URL=https://raw.githubusercontent.com/microsoft/onnxruntime/v1.19.0/include/onnxruntime/core/session/onnxruntime_c_api.h
ORT_HEADER_SHA256=bfdb387ef6f576ccbeb18c63e19fe5854aa0c278a3838027e9f764419e61475e

# Paths inside a TRITON_SOURCES folder (as in ../shared/vendor), without .tar.gz.
source_archives() {
    local repo
    for repo in "${!COMMITS[@]}"; do echo "triton-r24.10/$repo"; done
    echo "rapidjson-${RAPIDJSON_COMMIT:0:8}/rapidjson"
    echo "googletest-${GTEST_COMMIT:0:8}/googletest"
}
ORT_HEADER_PATH=onnxruntime-1.19.0/include/onnxruntime_c_api.h

# fetch_git DIR URL COMMIT: a shallow clone of one commit; the commit id is the content's
# checksum, and git checks it.
fetch_git() {
    git init --quiet "$1"
    git -C "$1" fetch --quiet --depth 1 "$2" "$3" || return 1
    git -C "$1" checkout --quiet FETCH_HEAD
}
# The URL each source_archives entry comes from, and its commit.
source_url() {
    case $1 in
        triton-r24.10/*) echo "https://github.com/triton-inference-server/${1#*/} ${COMMITS[${1#*/}]}" ;;
        rapidjson-*) echo "https://github.com/Tencent/rapidjson $RAPIDJSON_COMMIT" ;;
        googletest-*) echo "https://github.com/google/googletest $GTEST_COMMIT" ;;
    esac
}
