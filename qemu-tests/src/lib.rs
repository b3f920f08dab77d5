//! qemu-tests harness
