# longshore: build, test, demo, benchmark.
#
# Every target that needs system packages installs them first (Debian 12, as root), so
# `make demo` and `make test` work on a fresh machine.

CARGO ?= cargo
PREFIX ?= /usr
DESTDIR ?=

# What building needs besides the Rust toolchain: libudev for the udev crate.
BUILD_PACKAGES := pkg-config libudev-dev
# What the tests need: skopeo (copies, the image proxy), tar and zstd (listing and
# making streams), util-linux (setpriv ties the proxy to longshore's life, losetup),
# docker-registry (a real registry on loopback for `bundle create docker://`), dbus and
# systemd (a private bus and a user manager), udev (systemd-udevd for media tests),
# dosfstools, mtools, e2fsprogs and xorriso (media images).
TEST_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates docker-registry \
	dbus systemd udev dosfstools mtools e2fsprogs xorriso xfsprogs
# The demo shows the store with podman.
DEMO_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates podman
# The benchmark compares verification with openssl's sha256.
BENCH_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates openssl \
	dbus systemd udev e2fsprogs

.PHONY: all build test test-deps demo bench clean lint

all: build

build:
	$(call apt_install,$(BUILD_PACKAGES))
	$(CARGO) build --release --locked

# Installs Debian packages that are missing; does nothing when all are there.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

test-deps:
	$(call apt_install,$(TEST_PACKAGES))

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

test: test-deps lint
	$(CARGO) test --locked

demo:
	$(call apt_install,$(DEMO_PACKAGES))
	$(CARGO) build --release --locked --bin longshore --example sample-images
	./demo/run.sh

bench:
	$(call apt_install,$(BENCH_PACKAGES))
	$(CARGO) build --release --locked --bin longshore
	$(CARGO) bench --locked --bench import
	$(CARGO) bench --locked --bench daemon

clean:
	$(CARGO) clean
