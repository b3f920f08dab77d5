# Ballast: `make image` builds the default image, `make test` runs every test.
# Both install the Debian packages they need first (run as root on Debian 12).

SHELL := /bin/bash
CARGO ?= cargo
# Reproducible by default: every file in the root gets the time of the last commit.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH

# Host packages: image building, QEMU + OVMF for the tests and `make run`,
# systemd-boot-efi for the UKI unit tests, cryptsetup-bin for the verity tests,
# cloud-image-utils (cloud-localds, pulls genisoimage) for the provisioning tests,
# netcat-openbsd to forward the guest's update channel connections to the host.
# protobuf-compiler builds the etcd client; etcd-server, etcd-client (etcdctl) and
# openssl (test certificates) for the fleet tests; docker-registry (a real OCI
# registry) and skopeo (pushes test images to it) for the container puller's
# tests and bench; busybox-static (the payload of the QEMU containers test's
# image).
HOST_PACKAGES := mmdebstrap erofs-utils cryptsetup-bin dosfstools mtools binutils \
	e2fsprogs fdisk qemu-utils qemu-system-x86 ovmf systemd-boot-efi openssh-client \
	zstd ca-certificates cloud-image-utils netcat-openbsd \
	protobuf-compiler etcd-server etcd-client openssl docker-registry skopeo \
	busybox-static

IMAGE_SPEC ?= configs/image.yaml
OUT ?= out
TEST_OUT ?= out/test
IMAGE_BUILD := target/release/image-build

.PHONY: deps build image test-image test unit-test qemu-test run lint bench clean

deps:
	@missing=$$(for p in $(HOST_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing host packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root to install packages" >&2; exit 1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

build: deps
	$(CARGO) build --release --locked -p os-agent -p image-build

image: build
	$(IMAGE_BUILD) build --config $(IMAGE_SPEC) --output $(OUT)

# The test image, and the releases the update tests publish to it
# (qemu-tests/tests/update.rs): 0.2.0, 0.3.0 and 0.1.1 whose health check fails.
test-image: build
	$(IMAGE_BUILD) build --config qemu-tests/test-image.yaml --output $(TEST_OUT)
	for v in v2 v3 bad; do \
		$(IMAGE_BUILD) build --config qemu-tests/test-image-$$v.yaml --output $(TEST_OUT)-$$v || exit 1; \
	done

unit-test: deps
	$(CARGO) test --locked --workspace --exclude qemu-tests

qemu-test: test-image
	BALLAST_TEST_IMAGE_DIR=$(abspath $(TEST_OUT)) $(CARGO) test --locked -p qemu-tests -- --test-threads=1

test: unit-test qemu-test

# Benchmarks print their figures and ratios; they assert nothing. The
# containers bench boots the test image for its desired → running half.
bench: deps test-image
	@command -v curl >/dev/null || apt-get install -y -q curl
	$(CARGO) build --release --locked -p ballast-bench
	target/release/update-throughput 256 4
	target/release/fleet-sim 1000 50 2
	BALLAST_TEST_IMAGE_DIR=$(abspath $(TEST_OUT)) target/release/containers 128 5

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
run:
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
