# Ballast: `make image` builds the default image, `make test` runs every test.
# Both install the Debian packages they need first (run as root on Debian 12).

SHELL := /bin/bash
CARGO ?= cargo
# Reproducible by default: every file in the root gets the time of the last commit.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH

# Host packages, in two sets: what building an image needs (`make image`),
# and what the tests need on top (`make test`, `make bench`).
# Building: mmdebstrap bootstraps the root, erofs-utils/cryptsetup-bin make the
# slot and its verity tree, dosfstools/mtools the ESP, binutils (objcopy) and
# systemd-boot-efi the UKI, e2fsprogs/fdisk the data partition and the table,
# qemu-utils (qemu-img) the qcow2, zstd the payload; protobuf-compiler builds
# the etcd client; openssl and sbsigntool make Secure Boot keys and sign
# (faketime pins the signing time to SOURCE_DATE_EPOCH).
BUILD_PACKAGES := mmdebstrap erofs-utils cryptsetup-bin dosfstools mtools binutils \
	sbsigntool faketime openssl \
	e2fsprogs fdisk qemu-utils systemd-boot-efi zstd ca-certificates protobuf-compiler
# Testing: QEMU + OVMF boot the image, openssh-client logs in,
# cloud-image-utils (cloud-localds) makes NoCloud seeds, netcat-openbsd forwards
# the guest's channel connections; etcd-server, etcd-client (etcdctl) and
# openssl (certificates) for the fleet tests; docker-registry (a real OCI
# registry), skopeo (pushes test images to it) and busybox-static (the QEMU
# containers test's payload) for the containers tests.
TEST_PACKAGES := qemu-system-x86 ovmf openssh-client cloud-image-utils netcat-openbsd \
	etcd-server etcd-client openssl docker-registry skopeo busybox-static

# Installs the packages named in $(1) that are missing. qemu-system-x86 and
# qemu-utils come from one source package and must be of one version: a
# machine that ships a newer qemu-utils (bookworm-backports) without a
# matching qemu-system-x86 gets qemu-utils of qemu-system-x86's version with
# it (qemu-img of either version serves the build). Anything apt still refuses
# is printed with the command to run.
define install-packages
	@set -euo pipefail; \
	missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "installing host packages:" $$missing; \
	if [ "$$(id -u)" != 0 ]; then echo "run as root to install: apt-get install" $$missing >&2; exit 1; fi; \
	apt-get update -q >/dev/null; \
	extra=; \
	if echo "$$missing" | grep -qx qemu-system-x86; then \
		want=$$(apt-cache policy qemu-system-x86 | sed -n 's/^  Candidate: //p'); \
		have=$$(dpkg-query -W -f='$${Version}' qemu-utils 2>/dev/null || true); \
		if [ -z "$$want" ] || [ "$$want" = "(none)" ]; then \
			echo "no qemu-system-x86 in the configured apt sources: add Debian 12 (bookworm) main" >&2; exit 1; \
		fi; \
		if [ -n "$$have" ] && [ "$$have" != "$$want" ]; then \
			echo "qemu-utils $$have is installed, qemu-system-x86 $$want needs its own version: installing qemu-utils $$want with it"; \
			extra="qemu-utils=$$want qemu-block-extra- "; \
		fi; \
	fi; \
	cmd="apt-get install -y -q --no-install-recommends --allow-downgrades $$missing $$extra"; \
	if ! DEBIAN_FRONTEND=noninteractive $$cmd; then \
		echo "could not install host packages; apt said:" >&2; \
		apt-get install -s --no-install-recommends --allow-downgrades $$missing $$extra 2>&1 | grep -E '^ |^E:|Breaks|Depends' >&2 || true; \
		echo "resolve the conflict above, then run: $$cmd" >&2; exit 1; \
	fi
endef

IMAGE_SPEC ?= configs/image.yaml
OUT ?= out
TEST_OUT ?= out/test
IMAGE_BUILD := target/release/image-build

.PHONY: deps test-deps build image test-image test unit-test qemu-test fuzz-deps fuzz fuzz-smoke run lint bench clean

deps:
	$(call install-packages,$(BUILD_PACKAGES))
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

test-deps: deps
	$(call install-packages,$(TEST_PACKAGES))

build: deps
	$(CARGO) build --release --locked -p os-agent -p image-build

image: build
	$(IMAGE_BUILD) build --config $(IMAGE_SPEC) --output $(OUT)

# The test image, and the releases the update tests publish to it
# (qemu-tests/tests/update.rs): 0.2.0 to 0.6.0, and 0.1.1 whose health check fails.
# Those are only ever published (image-build release reads build.json, the
# root's .zst, its verity area and the UKI), never booted from their own disk:
# their disk images and uncompressed root (810 MB a build) are removed. The
# metal image (qemu-tests/tests/metal.rs) is booted from its qcow2 only.
test-image: build
	$(IMAGE_BUILD) build --config qemu-tests/test-image.yaml --output $(TEST_OUT)
	for v in v2 v3 v4 v5 v6 bad; do \
		$(IMAGE_BUILD) build --config qemu-tests/test-image-$$v.yaml --output $(TEST_OUT)-$$v || exit 1; \
		rm -f $(TEST_OUT)-$$v/*.raw $(TEST_OUT)-$$v/*.qcow2 $(TEST_OUT)-$$v/*.root.erofs; \
	done
	$(IMAGE_BUILD) build --config qemu-tests/test-image-metal.yaml --output $(TEST_OUT)-metal
	rm -f $(TEST_OUT)-metal/*.raw $(TEST_OUT)-metal/*.root.erofs

unit-test: test-deps
	$(CARGO) test --locked --workspace --exclude qemu-tests

qemu-test: test-deps test-image
	BALLAST_TEST_IMAGE_DIR=$(abspath $(TEST_OUT)) $(CARGO) test --locked -p qemu-tests -- --test-threads=1

test: unit-test qemu-test fuzz-smoke

# Fuzzing (fuzz/README.md): every parser of untrusted input has a cargo-fuzz
# target. `make fuzz` runs each for FUZZ_SECONDS (default 10 minutes);
# `make test` runs each for a short while from the committed corpus. New
# inputs go to $(FUZZ_WORK), findings to fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_WORK ?= $(abspath target/fuzz-corpus)
FUZZ_RUN = CARGO_PROFILE_RELEASE_LTO=false $(CARGO) +nightly fuzz run --features libfuzzer $(FUZZ_FLAGS)
fuzz-deps:
	@rustup run nightly rustc --version >/dev/null 2>&1 || { echo "fuzzing needs a nightly Rust toolchain: rustup toolchain install nightly" >&2; exit 1; }
	@$(CARGO) +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) +nightly install --locked cargo-fuzz

define fuzz-all
	@set -e; for t in $$($(CARGO) +nightly fuzz list); do \
		mkdir -p $(FUZZ_WORK)/$$t; \
		log=$(FUZZ_WORK)/$$t.log; \
		if ! $(FUZZ_RUN) $$t $(FUZZ_WORK)/$$t fuzz/corpus/$$t -- -max_total_time=$(1) -rss_limit_mb=2048 -print_final_stats=1 >$$log 2>&1; then \
			tail -n 40 $$log >&2; echo "fuzz target $$t failed: see $$log and fuzz/artifacts/$$t" >&2; exit 1; \
		fi; \
		echo "fuzz $$t: $$(sed -n 's/^stat::number_of_executed_units: *//p' $$log) runs in $(1) s, corpus $$(ls $(FUZZ_WORK)/$$t | wc -l) inputs"; \
	done
endef

fuzz: fuzz-deps
	$(call fuzz-all,$(FUZZ_SECONDS))

# A debug build without AddressSanitizer: the smoke run is about panics and
# hangs in our (safe) parsers, and it builds in a few minutes where the
# optimized, sanitized build of ten targets takes half an hour on 2 cores.
fuzz-smoke: FUZZ_FLAGS = --dev --sanitizer none
fuzz-smoke: fuzz-deps
	$(call fuzz-all,$(FUZZ_SMOKE_SECONDS))

# Benchmarks print their figures and ratios; they assert nothing. The
# release size is the default image's (`make image`); the containers bench
# boots the test image for its desired → running half.
bench: test-deps image test-image
	@command -v curl >/dev/null || apt-get install -y -q curl
	$(CARGO) build --release --locked -p ballast-bench
	target/release/release-size $(OUT)/build.json
	target/release/update-throughput 256 4
	target/release/fleet-sim 1000 50 2
	target/release/fleet-sim 10000 200 2
	BALLAST_TEST_IMAGE_DIR=$(abspath $(TEST_OUT)) target/release/containers 128 5
	target/release/boot $(OUT) 3

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

# Boot the built image with its serial console on this terminal (Ctrl-A X quits).
# SSH is forwarded from 127.0.0.1:2222. KVM is used if ACCEL=kvm.
# USER_DATA=<file> hands a #cloud-config document to the guest over fw_cfg
# (give root your key with ssh_authorized_keys; see docs/user-data.md).
ACCEL ?= tcg
comma := ,
USER_DATA ?=
run: test-deps
	@test -f $(OUT)/build.json || { echo "no image in $(OUT): run make image first" >&2; exit 1; }
	@qcow=$$(sed -n 's/.*"qcow2": "\(.*\)".*/\1/p' $(OUT)/build.json); \
	cp /usr/share/OVMF/OVMF_VARS_4M.fd $(OUT)/run-vars.fd; \
	qemu-img create -q -f qcow2 -b "$$qcow" -F qcow2 $(OUT)/run-disk.qcow2 8G; \
	qemu-system-x86_64 -machine q35 -accel $(ACCEL) -m 2048 -smp 2 -nographic \
		-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
		-drive if=pflash,format=raw,file=$(OUT)/run-vars.fd \
		-drive if=none,id=d0,file=$(OUT)/run-disk.qcow2,format=qcow2 -device virtio-blk-pci,drive=d0 \
		-netdev user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22 -device virtio-net-pci,netdev=n0 \
		$(if $(USER_DATA),-fw_cfg name=opt/org.ballast/user-data$(comma)file=$(abspath $(USER_DATA)))

clean:
	rm -rf $(OUT) target
