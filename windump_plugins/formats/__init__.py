"""Windows and QEMU layouts as data: the dump header, CONTEXT, KDBG, KUSER_SHARED_DATA, ELF and
its notes, the VMCOREINFO note. These modules import nothing of windump but its errors."""
