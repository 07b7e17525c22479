"""Builders of the dump header for a source, each a ``windump_dump_header`` implementation (the header
the guest published through QEMU's vmcoreinfo device, checked and patched as QEMU does), and the
choice among their candidates."""
