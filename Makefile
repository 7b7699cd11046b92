# longshore: build, test, demo, benchmark.
#
# Every target that needs system packages installs them first (Debian 12, as root), so
# `make demo` and `make test` work on a fresh machine.

CARGO ?= cargo

# Where `make install` puts things (DESTDIR is prepended to each). systemd, udev and
# tmpfiles also read their /usr/local/lib directories; dbus-daemon reads /usr/share and
# /etc only, so with PREFIX=/usr/local set DBUSPOLICYDIR=/etc/dbus-1/system.d.
PREFIX ?= /usr
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
DOCDIR ?= $(DATADIR)/doc/longshore
UNITDIR ?= $(PREFIX)/lib/systemd/system
UDEVRULESDIR ?= $(PREFIX)/lib/udev/rules.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DBUSPOLICYDIR ?= $(DATADIR)/dbus-1/system.d
# The binary reads its shipped defaults from /usr/lib/longshore, whatever PREFIX is.
DEFAULTSDIR ?= /usr/lib/longshore/config.d
# The cargo profile `make install` and `make rpm` build (`dev` for quick checks).
CARGO_PROFILE ?= release
TARGET_DIR ?= target
PROFILE_DIR := $(if $(filter dev,$(CARGO_PROFILE)),debug,$(CARGO_PROFILE))
BIN := $(TARGET_DIR)/$(PROFILE_DIR)/longshore
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

# What building needs besides the Rust toolchain: libudev for the udev crate.
BUILD_PACKAGES := pkg-config libudev-dev
# What the tests need: skopeo (copies, the image proxy), tar and zstd (listing and
# making streams), util-linux (setpriv ties the proxy to longshore's life, losetup),
# docker-registry (a real registry on loopback for `bundle create docker://`), dbus and
# systemd (a private bus and a user manager), udev (systemd-udevd for media tests),
# dosfstools, mtools, e2fsprogs, xorriso and xfsprogs (media images); ignition
# (ignition-validate), rpm, rpmlint and gnupg (building, signing and linting the RPM),
# man-db (systemd-analyze verify checks the unit's man pages), debootstrap and
# systemd-container (a node booted with systemd-nspawn) for the packaging tests;
# exfatprogs for exfat sticks and qemu (tests/vm/install-qemu.sh) for the VM tests;
# apache2-utils (htpasswd) and openssl for a registry with password auth and TLS;
# iproute2 (ip, tc) for the nodes of the sharing tests, each a network namespace.
TEST_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates docker-registry \
	dbus systemd udev dosfstools mtools e2fsprogs xorriso xfsprogs \
	ignition rpm rpmlint gnupg man-db make debootstrap systemd-container exfatprogs \
	apache2-utils openssl iproute2
# The demo shows the store with podman.
DEMO_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates podman
# The benchmark compares verification with openssl's sha256, pre-loads from
# docker-registry behind a link shaped with tc (iproute2) in network namespaces, and
# serves and shares between nodes in network namespaces.
BENCH_PACKAGES := $(BUILD_PACKAGES) skopeo tar zstd util-linux ca-certificates openssl \
	dbus systemd udev e2fsprogs docker-registry iproute2

.PHONY: all build test test-deps demo bench clean lint binary install rpm ignition-examples fuzz

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
	./tests/vm/install-qemu.sh

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
	$(CARGO) bench --locked --bench preload
	$(CARGO) bench --locked --bench share

# Fuzzing the parsers of untrusted input with cargo-fuzz (libFuzzer) on the stable
# toolchain, without a sanitizer: each target runs FUZZ_SECONDS (an hour by default),
# with memory held to FUZZ_RSS_MB, from a corpus seeded with tar streams of each format, a
# real bundle's bundle.json and index.json, and the shipped configuration.
FUZZ_SECONDS ?= 3600
FUZZ_RSS_MB ?= 512
FUZZ_TARGETS := tar_reader documents config_and_sets
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p $(addprefix fuzz/corpus/,$(FUZZ_TARGETS))
	seed=$$(mktemp -d) && mkdir -p $$seed/blobs/sha256 && echo '{}' > $$seed/bundle.json && \
		echo x > $$seed/blobs/sha256/$$(printf '%064d' 0) && \
		for f in gnu pax ustar v7; do tar --format=$$f -cf fuzz/corpus/tar_reader/seed-$$f.tar -C $$seed bundle.json blobs; done; \
		rm -rf $$seed
	$(CARGO) build --release --locked --bin longshore --example sample-images
	seed=$$(mktemp -d) && ./target/release/examples/sample-images $$seed/images > $$seed/sources && \
		./target/release/longshore bundle create -o $$seed/bundle --name seed $$(cat $$seed/sources) >/dev/null && \
		{ cat $$seed/bundle/bundle.json; printf '\0'; cat $$seed/bundle/index.json; } > fuzz/corpus/documents/seed-bundle; \
		rm -rf $$seed
	cp config/10-defaults.toml fuzz/corpus/config_and_sets/seed-defaults.toml
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		cargo fuzz run -s none $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=$(FUZZ_RSS_MB) || exit 1; \
	done

# The binary alone, in the profile asked for.
binary:
	$(CARGO) build --locked --profile $(CARGO_PROFILE) --target-dir $(TARGET_DIR) --bin longshore

# Installs every file where the distribution expects it; see docs/install.md.
install: binary
	install -Dm0755 $(BIN) $(DESTDIR)$(BINDIR)/longshore
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|^ExecStart=/usr/bin/longshore |ExecStart=$(BINDIR)/longshore |' systemd/longshore.service \
		> $(DESTDIR)$(UNITDIR)/longshore.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/longshore.service
	install -Dm0644 systemd/70-longshore.rules $(DESTDIR)$(UDEVRULESDIR)/70-longshore.rules
	install -Dm0644 systemd/longshore.tmpfiles $(DESTDIR)$(TMPFILESDIR)/longshore.conf
	install -Dm0644 systemd/io.longshore.Longshore1.conf \
		$(DESTDIR)$(DBUSPOLICYDIR)/io.longshore.Longshore1.conf
	install -Dm0644 config/10-defaults.toml $(DESTDIR)$(DEFAULTSDIR)/10-defaults.toml
	$(BIN) generate man --dir $(DESTDIR)$(MANDIR)/man8
	install -d $(DESTDIR)$(DATADIR)/bash-completion/completions \
		$(DESTDIR)$(DATADIR)/zsh/site-functions $(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	$(BIN) generate completions bash > $(DESTDIR)$(DATADIR)/bash-completion/completions/longshore
	$(BIN) generate completions zsh > $(DESTDIR)$(DATADIR)/zsh/site-functions/_longshore
	$(BIN) generate completions fish > $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/longshore.fish
	install -Dm0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/

# The Ignition config, its Butane source and the MachineConfigs in ignition/, rendered
# with the example site configuration and set file for the binary this tree builds.
IGNITION_URL ?= https://downloads.example.com/longshore/$(VERSION)/longshore-x86_64
IGNITION_ARGS = --binary-url $(IGNITION_URL) --config ignition/examples/50-site.toml \
	--set ignition/examples/plant-floor.toml
ignition-examples: binary
	$(BIN) generate ignition $(IGNITION_ARGS) --binary $(BIN) > ignition/longshore.ign
	$(BIN) generate ignition $(IGNITION_ARGS) --binary $(BIN) --butane > ignition/longshore.bu
	$(BIN) generate machineconfig $(IGNITION_ARGS) --binary $(BIN) --role worker \
		> ignition/50-worker-longshore.yaml
	$(BIN) generate machineconfig $(IGNITION_ARGS) --binary $(BIN) --role master \
		> ignition/50-master-longshore.yaml

# What `make rpm` needs on Debian: rpmbuild (the spec builds with cargo as on RHEL).
RPM_PACKAGES := $(BUILD_PACKAGES) rpm

# Builds the RPM from this source tree into target/rpm/RPMS. Where the build machine's
# rpm lacks systemd's macros (Debian), packaging/fallback.macros stands in for them.
rpm:
	$(call apt_install,$(RPM_PACKAGES))
	rm -rf target/rpm && mkdir -p target/rpm/SOURCES
	tar --exclude=./target --exclude=./.git --exclude=./fuzz/target --exclude=./fuzz/corpus \
		--exclude=./fuzz/artifacts --transform 's|^\.|longshore-$(VERSION)|' \
		-czf target/rpm/SOURCES/longshore-$(VERSION).tar.gz .
	macros=""; [ -n "$$(rpm --eval '%{?_unitdir}')" ] || macros="--load packaging/fallback.macros"; \
	rpmbuild -bb --nodeps $$macros --define "_topdir $(CURDIR)/target/rpm" \
		--define "cargo_profile $(CARGO_PROFILE)" --define "cargo_target_dir $(abspath $(TARGET_DIR))" \
		packaging/longshore.spec

clean:
	$(CARGO) clean
