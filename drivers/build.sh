#!/bin/sh
# Build the bare-metal test guest: drivers/build.sh [OUTDIR] writes OUTDIR/guest.elf (default drivers/build).
# QEMU's multiboot loader refuses ELF64, so the x86-64 link is rewrapped as ELF32.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/build"}
mkdir -p "$out"
gcc -c -o "$out/guest.o" "$here/guest.S"
ld -m elf_x86_64 -nostdlib -z max-page-size=0x1000 -z noexecstack --no-warn-rwx-segments -T "$here/guest.ld" -o "$out/guest64.elf" "$out/guest.o"
objcopy -O elf32-i386 "$out/guest64.elf" "$out/guest.elf"
echo "$out/guest.elf"
