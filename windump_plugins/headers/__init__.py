"""Builders of the dump header for a source: the header the guest published through QEMU's
vmcoreinfo device, checked and patched as QEMU does."""
