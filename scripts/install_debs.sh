#!/usr/bin/env bash
# Install the Debian packages named as arguments that are missing (make test-deps).
#
#   scripts/install_debs.sh PACKAGE...
#   scripts/install_debs.sh --optional "WHAT IS LOST WITHOUT THEM" PACKAGE...
#
# Nothing to do: silent, no apt-get. As root or with passwordless sudo: apt-get update, then
# install what is missing, saying what and how long it took. Otherwise exit 2 at once with
# the command to run, rather than failing minutes later in a test; --optional says what is
# lost and the command, and exits 0.
set -euo pipefail

optional=""
if [[ ${1:-} == --optional ]]; then
    optional=$2
    shift 2
fi

missing=()
for deb in "$@"; do
    dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$deb")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

command="apt-get install -y --no-install-recommends ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
elif [[ -n $optional ]]; then
    echo "install_debs: ${missing[*]} missing and not root: $optional; to install them:" >&2
    echo "    sudo apt-get update && sudo $command" >&2
    exit 0
else
    echo "install_debs: needs the Debian packages ${missing[*]}; run as root:" >&2
    echo "    sudo apt-get update && sudo $command" >&2
    exit 2
fi
command -v apt-get >/dev/null \
    || { echo "install_debs: no apt-get: install ${missing[*]} by hand" >&2; exit 2; }

echo "Installing from Debian: ${missing[*]} (apt-get update, then the packages: usually" \
    "under a minute; a container engine takes a few)"
start=$SECONDS
# Another apt run (unattended upgrades) holds the lock: wait for it rather than fail.
wait_lock=(-o DPkg::Lock::Timeout=600)
"${as_root[@]}" apt-get "${wait_lock[@]}" update -qq \
    && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive $command -q "${wait_lock[@]}" \
    || { echo "install_debs: apt-get failed (above); to retry: $command" >&2; exit 1; }
echo "Installed ${missing[*]} in $((SECONDS - start)) s"
