#!/bin/bash
# Ballast's initrd module: mounts the data partition on /sysroot/var and an
# overlay on /sysroot/etc whose upper layer lives on it, before switch-root.

check() {
    return 0
}

depends() {
    echo systemd
    return 0
}

installkernel() {
    hostonly='' instmods overlay ext4
}

install() {
    inst_multiple mkdir e2fsck fsck fsck.ext4
    local u
    for u in sysroot-var.mount sysroot-etc.mount ballast-etc-dirs.service; do
        inst_simple "$moddir/$u" "$systemdsystemunitdir/$u"
    done
    inst_simple "$moddir/udev-trigger.conf" \
        "$systemdsystemunitdir/systemd-udev-trigger.service.d/90-ballast.conf"
    mkdir -p "${initdir}${systemdsystemunitdir}/initrd-fs.target.requires"
    for u in sysroot-var.mount sysroot-etc.mount; do
        ln_r "$systemdsystemunitdir/$u" "$systemdsystemunitdir/initrd-fs.target.requires/$u"
    done
}
