"""Transports to a live QEMU: the gdbstub's remote protocol, QMP and HMP, QEMU's process memory and
its streamed ELF dump. They know nothing of sources, headers or dump writing."""
