#!/bin/sh
# Installs qemu-system-x86 and qemu-utils (qemu-img) for the VM tests, when missing.
#
# Debian 12 machines of this kind carry qemu-utils from bookworm-backports, and that
# version Breaks bookworm's qemu-system-common: a plain `apt-get install qemu-system-x86`
# then fails with "held broken packages". In that case qemu-system-x86 comes from
# bookworm-backports as well, read through a sources list of our own, so the machine's
# apt configuration is not changed. Anywhere else bookworm's own package is taken.
set -eu

command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null && exit 0

export DEBIAN_FRONTEND=noninteractive
utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
case "$utils" in
*bpo12*)
    apt_dir=$(mktemp -d /tmp/longshore-apt.XXXXXX)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/lists/partial"
    chmod 0755 "$apt_dir"  # apt downloads as _apt
    key=/usr/share/keyrings/debian-archive-keyring.gpg
    for suite in bookworm bookworm-updates bookworm-backports; do
        echo "deb [signed-by=$key] http://deb.debian.org/debian $suite main"
    done > "$apt_dir/sources.list"
    echo "deb [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main" \
        >> "$apt_dir/sources.list"
    set -- -o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
        -o "Dir::State::lists=$apt_dir/lists"
    echo "installing qemu-system-x86 from bookworm-backports (qemu-utils $utils is from there)"
    apt-get "$@" update -qq
    apt-get "$@" install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils >/dev/null
    ;;
*)
    echo "installing qemu-system-x86"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
    ;;
esac
