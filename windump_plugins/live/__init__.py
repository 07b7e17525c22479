"""Transports to a live QEMU and the guest-RAM readers stacked on them: the gdbstub's remote
protocol, QMP and HMP, QEMU's shared memory, its process memory and its streamed ELF dump, tried in
a declared order (:mod:`.layers`). They know nothing of sources, headers or dump writing."""
