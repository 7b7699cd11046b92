#!/usr/bin/env bash
# The main job end to end, in a sandbox: make a bundle of sample images, import it into
# a node's store under --sysroot, show what longshore and the store now say.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=${DEMO_DIR:-/tmp/longshore-demo}
longshore=$PWD/target/release/longshore

# A previous run's store may still be mounted (overlay keeps its home mounted).
if [ -d "$demo" ]; then
	{ grep -o " $demo[^ ]*" /proc/self/mountinfo || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
	rm -rf "$demo"
fi
mkdir -p "$demo/node/etc/longshore/config.d"
# The sandbox has no CRI-O to reload; on a node longshore reloads crio.service over D-Bus.
printf '[crio]\nreload = false\n' > "$demo/node/etc/longshore/config.d/50-demo.toml"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Sample images (an OCI layout, as a vendor would ship them)"
mapfile -t sources < <(./target/release/examples/sample-images "$demo/images")
printf '  %s\n' "${sources[@]}"

step "longshore bundle create: one verifiable bundle, layers shared by images stored once"
"$longshore" bundle create -o "$demo/site-apps-1.0.tar.zst" --name site-apps --version 1.0 "${sources[@]}"
ls -lh "$demo/site-apps-1.0.tar.zst"

step "longshore verify: check every digest without importing"
"$longshore" verify "$demo/site-apps-1.0.tar.zst"

step "longshore import into the node at $demo/node (--sysroot)"
"$longshore" --sysroot "$demo/node" import "$demo/site-apps-1.0.tar.zst"

step "Importing the same bundle again copies nothing"
"$longshore" --sysroot "$demo/node" import "$demo/site-apps-1.0.tar.zst"

step "longshore status: bundles, image sets and images"
"$longshore" --sysroot "$demo/node" status

step "longshore cache: the bundle's original blobs, kept once each to heal the store from"
"$longshore" --sysroot "$demo/node" cache

step "The pins CRI-O reads, so kubelet's image garbage collection keeps the images"
cat "$demo/node/etc/crio/crio.conf.d/99-longshore-pinned-images.conf"

step "The images in the node's containers-storage (podman images)"
podman --root "$demo/node/var/lib/containers/storage" --runroot "$demo/node/run/containers/storage" \
	images --digests --format 'table {{.Repository}} {{.Tag}} {{.Digest}} {{.Size}}'

printf '\nThe sandbox stays in %s; run `make demo` again to start over.\n' "$demo"
