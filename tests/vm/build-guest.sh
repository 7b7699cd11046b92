#!/bin/bash
# build-guest.sh DIR: the Debian 12 guest the VM tests boot (see tests/vm/README.md).
#
# Leaves in DIR:
#   rootfs/            the guest's root tree, customised; the tests copy it, install
#                      longshore into the copy with `make install DESTDIR=` and make an
#                      ext4 image of it with `mke2fs -d` (no loop device, no mount)
#   vmlinuz, initrd.img  Debian's own kernel and an initramfs that mounts /dev/vda
#   guest.stamp        the hash of this script: when it matches, nothing is done
#
# The slow part, debootstrap (about two minutes), is cached in DIR/base-KEY.tar.zst, KEY
# being a hash of the suite and the package list, so a change to the customisation
# below costs an extraction, not a debootstrap. Root only. No network in the guest: the
# packages are all installed here.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, chroot)" >&2; exit 1; }

DIR=$(mkdir -p "$1" && cd "$1" && pwd)
MIRROR=${LONGSHORE_TEST_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# skopeo depends on the virtual container-network-stack, which debootstrap cannot
# resolve: netavark (the small provider) is named.
PACKAGES=linux-image-amd64,initramfs-tools,systemd-sysv,udev,dbus,qemu-guest-agent,kmod,util-linux,mount,e2fsprogs,dosfstools,exfatprogs,procps,zstd,netavark,skopeo

say() { echo "build-guest: $*" >&2; }

stamp=$(sha256sum "$0" | cut -c1-16)
if [ "$(cat "$DIR/guest.stamp" 2>/dev/null)" = "$stamp" ] && [ -s "$DIR/vmlinuz" ] \
    && [ -s "$DIR/initrd.img" ] && [ -d "$DIR/rootfs/usr" ]; then
    exit 0
fi

base_key=$(echo "$SUITE $PACKAGES" | sha256sum | cut -c1-16)
base="$DIR/base-$base_key.tar.zst"
work=$(mktemp -d "$DIR/.work.XXXXXX")
trap 'for m in $(awk -v w="$work" "index(\$2, w) == 1 {print \$2}" /proc/mounts | sort -r); do umount -l "$m"; done; rm -rf --one-file-system "$work"' EXIT
root="$work/rootfs"

if [ ! -s "$base" ]; then
    say "debootstrap $SUITE into $root (a few minutes, once)"
    mkdir -p "$DIR/debs"
    if ! debootstrap --variant=minbase --cache-dir="$DIR/debs" --include="$PACKAGES" \
        "$SUITE" "$root" "$MIRROR" > "$work/debootstrap.log" 2>&1; then
        tail -30 "$work/debootstrap.log" >&2
        exit 1
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" --zstd --numeric-owner --xattrs --xattrs-include='*' -cpf "$base.part" .
    mv "$base.part" "$base"
    rm -f $(ls "$DIR"/base-*.tar.zst | grep -v "$base_key") 2>/dev/null || true
else
    mkdir "$root"
    tar -C "$root" --zstd --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
fi

say "customising"
kver=$(basename "$(ls -d "$root"/usr/lib/modules/*)")
echo node > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tnode\n' > "$root/etc/hosts"
# fsck pass 1: after a power cut the initramfs replays the journal before / is mounted.
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"
# A root shell on the serial console, for reading console.log when a test fails.
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear - $TERM\n' \
    > "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
# Nothing that runs by the clock; a short stop timeout so a poweroff is quick.
rm -f "$root"/etc/systemd/system/timers.target.wants/*.timer \
    "$root/etc/systemd/system/getty.target.wants/getty@tty1.service" \
    "$root/etc/systemd/system/multi-user.target.wants/e2scrub_reap.service"
mkdir -p "$root/etc/systemd/system.conf.d"
printf '[Manager]\nDefaultTimeoutStopSec=15s\n' > "$root/etc/systemd/system.conf.d/10-test-guest.conf"
# The journal survives a power cut, so a test reads the boot before it.
mkdir -p "$root/var/log/journal" "$root/mnt/host" "$root/mnt/scratch"
# Every guest gets its own machine id at first boot; no first-boot prompt.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
ln -sf /dev/null "$root/etc/systemd/system/systemd-firstboot.service"
# Drivers a headless guest never loads: half of the module tree.
for d in sound drivers/gpu drivers/media drivers/infiniband drivers/net/wireless \
    drivers/net/ethernet drivers/staging drivers/iio drivers/bluetooth net/wireless \
    net/mac80211 net/bluetooth; do
    rm -rf "${root:?}/usr/lib/modules/$kver/kernel/$d"
done
chroot "$root" depmod -a "$kver"
# The initramfs needs virtio and ext4 only; the rest (xhci, usb-storage, sr_mod,
# virtio-scsi, 9p, vfat, exfat, isofs) loads from / on demand. FSTYPE is named because
# the fsck hook cannot probe / in a chroot.
printf 'MODULES=list\nFSTYPE=ext4\nCOMPRESS=zstd\n' > "$root/etc/initramfs-tools/conf.d/test-guest.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k "$kver" > /dev/null
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
    "$root"/var/log/*.log "$root"/var/log/apt/*

cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
rm -rf "$DIR/rootfs" "$DIR/vmlinuz" "$DIR/initrd.img"
mv "$work/vmlinuz" "$work/initrd.img" "$DIR/"
mv "$root" "$DIR/rootfs"
echo "$stamp" > "$DIR/guest.stamp"
say "ready: $DIR (kernel $kver)"
