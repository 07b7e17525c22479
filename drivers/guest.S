/*
 * A bare-metal x86-64 guest that plays a crashed Windows kernel for QEMU's dump-guest-memory -w.
 *
 * QEMU's multiboot loader enters _start in 32-bit protected mode. The guest reads the model's
 * BOOT_PARAMS at IMAGE_BASE (windump_plugins/guest/boot.py), enters long mode on the model's page
 * tables, stamps the model's pages, publishes the model's VMCOREINFO note through the fw_cfg file
 * etc/vmcoreinfo (as virtio-win's fwcfg64 driver does), starts the APs, loads every CPU's BOOT_CPU
 * record and halts. Progress and failures go to the debugcon port 0xE9 as "WINDUMP-..." lines.
 *
 * Physical memory the guest itself uses: [0x8000, 0x9000) for the AP trampoline and its kernel
 * image at [0x100000, 0x10A000), and it zeroes the rest of [0x100000, GUEST_RESERVED_END); the
 * model stamps pages from there up only. Every .set below that boot.py also defines must agree
 * with it (tests/test_guestmodel.py checks).
 */

        .set IMAGE_BASE,        0x400000
        .set GUEST_RESERVED_END, 0x200000
        .set BOOT_MAGIC_LO,     0x4F424457      /* "WDBOOT01" */
        .set BOOT_MAGIC_HI,     0x3130544F
        .set BP_CR3,            0x008
        .set BP_CPU_COUNT,      0x010
        .set BP_NOTE_SIZE,      0x014
        .set BP_NOTE_ADDRESS,   0x018
        .set BP_STAMP_COUNT,    0x020
        .set BP_FLAGS,          0x024
        .set BP_BUSY_ADDRESS,   0x028
        .set BP_STAMP_RANGES,   0x040
        .set BP_CPU,            0x200
        .set BOOT_CPU_SIZE,     0x200
        .set MAX_CPUS,          8
        .set MAX_STAMP_RANGES,  16
        .set STAMP_MAGIC,       0x21504D55444E4957
        .set BOOT_FLAG_KEEP_RUNNING, 1

        /* BOOT_CPU fields */
        .set CPU_GPR,           0x000           /* rax rbx rcx rdx rsi rdi rbp rsp r8..r15 */
        .set CPU_RFLAGS,        0x080
        .set CPU_GS_BASE,       0x088
        .set CPU_KERNEL_GS_BASE, 0x090
        .set CPU_FS_BASE,       0x098
        .set CPU_DR,            0x0A0
        .set CPU_DR7,           0x0C0
        .set CPU_MXCSR,         0x0C8
        .set CPU_XMM,           0x0D0

        .set MSR_EFER,          0xC0000080
        .set MSR_FS_BASE,       0xC0000100
        .set MSR_GS_BASE,       0xC0000101
        .set MSR_KERNEL_GS_BASE, 0xC0000102
        .set EFER_LME_NXE,      0x900
        .set CR0_PG_WP_NE_ET_MP_PE, 0x80010033
        .set CR4_PAE_PGE_OSFXSR_OSXMMEXCPT, 0x6A0
        .set RFLAGS_TF_IF,      0x300

        .set KGDT64_R0_CODE,    0x10
        .set KGDT64_R0_DATA,    0x18
        .set KGDT64_R3_DATA,    0x2B
        .set KGDT64_R3_CMTEB,   0x53
        .set GDT_CODE32,        0x08

        .set DEBUGCON,          0xE9
        .set FW_CFG_SELECTOR,   0x510
        .set FW_CFG_DATA,       0x511
        .set FW_CFG_DMA_HIGH,   0x514
        .set FW_CFG_DMA_LOW,    0x518
        .set FW_CFG_FILE_DIR,   0x19
        .set FW_CFG_DMA_CTL_ERROR, 0x01
        .set FW_CFG_DMA_CTL_SELECT, 0x08
        .set FW_CFG_DMA_CTL_WRITE, 0x10
        .set FW_CFG_FILE_ENTRY, 64              /* be32 size, be16 select, be16 reserved, name[56] */
        .set VMCOREINFO_FORMAT_ELF, 1

        .set LAPIC,             0xFEE00000
        .set LAPIC_ICR_LOW,     0x300
        .set LAPIC_ICR_HIGH,    0x310
        .set ICR_INIT_ALL_BUT_SELF, 0x000C4500
        .set ICR_SIPI_ALL_BUT_SELF, 0x000C4600
        .set TRAMPOLINE,        0x8000          /* SIPI vector 0x08 */

        .set STACK_SIZE,        0x1000

/* ------------------------------------------------------------------ multiboot header */
        .section .multiboot, "a"
        .balign 4
        .long 0x1BADB002
        .long 0
        .long -0x1BADB002

/* ------------------------------------------------------------------ 32-bit entry */
        .text
        .code32
        .globl _start
_start:
        cli
        cld
        lgdt gdt_pointer
        ljmp $GDT_CODE32, $1f
1:      mov $KGDT64_R0_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $stacks + STACK_SIZE, %esp
        cmpl $BOOT_MAGIC_LO, IMAGE_BASE
        jne bad_magic
        cmpl $BOOT_MAGIC_HI, IMAGE_BASE + 4
        jne bad_magic
        call enter_long_mode
        ljmp $KGDT64_R0_CODE, $bsp64

bad_magic:
        mov $msg_bad_magic, %esi
        mov $DEBUGCON, %dx
2:      lodsb
        test %al, %al
        jz 3f
        outb %al, %dx
        jmp 2b
3:      hlt
        jmp 3b

/* Turn on PAE paging with the model's CR3 and long mode; the caller jumps to 64-bit code. */
enter_long_mode:
        mov $CR4_PAE_PGE_OSFXSR_OSXMMEXCPT, %eax
        mov %eax, %cr4
        mov IMAGE_BASE + BP_CR3, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $EFER_LME_NXE, %eax
        wrmsr
        mov $CR0_PG_WP_NE_ET_MP_PE, %eax
        mov %eax, %cr0
        ret

/* An AP arrives here from the trampoline, in 32-bit protected mode with our GDT. */
ap32:
        mov $KGDT64_R0_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $1, %eax
        cpuid
        shr $24, %ebx                           /* APIC id: this CPU's index in QEMU's order */
        lea 1(%ebx), %esp
        shl $12, %esp
        add $stacks, %esp
        call enter_long_mode
        ljmp $KGDT64_R0_CODE, $ap64

/* ------------------------------------------------------------------ real-mode AP trampoline */
        .code16
trampoline:
        cli
        xor %ax, %ax
        mov %ax, %ds
        lgdtl TRAMPOLINE + (trampoline_gdt_pointer - trampoline)
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $GDT_CODE32, $ap32
        .balign 8
trampoline_gdt_pointer:
        .word gdt_end - gdt - 1
        .long gdt
trampoline_end:

/* ------------------------------------------------------------------ 64-bit code */
        .code64

/* Print the NUL-terminated string at %rsi on the debugcon port. */
puts:
        mov $DEBUGCON, %dx
1:      lodsb
        test %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      ret

fail:                                           /* %rsi: message */
        call puts
1:      cli
        hlt
        jmp 1b

/* Load the Windows kernel selectors; clears the FS/GS bases, which load_cpu sets afterwards. */
load_selectors:
        mov $KGDT64_R0_DATA, %ax
        mov %ax, %ss
        mov $KGDT64_R3_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %gs
        mov $KGDT64_R3_CMTEB, %ax
        mov %ax, %fs
        ret

bsp64:
        call load_selectors
        mov $stacks + STACK_SIZE, %rsp
        mov $msg_boot, %rsi
        call puts

        /* Zero what SeaBIOS left around the kernel below 2 MiB: it differs from boot to boot. */
        xor %eax, %eax
        mov $loaded_end, %rdi
        mov $bss_start, %rcx
        sub %rdi, %rcx
        rep stosb
        mov $guest_end, %rdi
        mov $GUEST_RESERVED_END, %rcx
        sub %rdi, %rcx
        rep stosb

        /* Stamp every page of StampRanges (byte ranges): its PFN, then STAMP_MAGIC. */
        mov $STAMP_MAGIC, %r9
        mov $IMAGE_BASE + BP_STAMP_RANGES, %r8
        mov IMAGE_BASE + BP_STAMP_COUNT, %ecx
        cmp $MAX_STAMP_RANGES, %ecx
        jbe 1f
        mov $msg_bad_stamps, %rsi
        jmp fail
1:      test %ecx, %ecx
        jz 4f
2:      mov (%r8), %rdi                         /* [start, end) physical bytes, page aligned */
        mov 8(%r8), %rdx
3:      cmp %rdx, %rdi
        jae 5f
        mov %rdi, %rax
        shr $12, %rax
        mov %rax, (%rdi)
        mov %r9, 8(%rdi)
        add $0x1000, %rdi
        jmp 3b
5:      add $16, %r8
        dec %ecx
        jnz 2b
4:      mov $msg_stamped, %rsi
        call puts

        call publish_vmcoreinfo
        mov $msg_published, %rsi
        call puts

        mov IMAGE_BASE + BP_CPU_COUNT, %ecx
        cmp $MAX_CPUS, %ecx
        jbe 1f
        mov $msg_bad_cpus, %rsi
        jmp fail
1:      cmp $1, %ecx
        jbe 2f
        call start_aps
        mov IMAGE_BASE + BP_CPU_COUNT, %ecx
        dec %ecx
1:      pause
        cmp ap_count(%rip), %ecx
        jne 1b
2:      mov $msg_ready, %rsi
        call puts

        mov $1, %eax
        cpuid
        shr $24, %ebx
        testl $BOOT_FLAG_KEEP_RUNNING, IMAGE_BASE + BP_FLAGS
        jz load_cpu
        call load_cpu_state
        mov IMAGE_BASE + BP_BUSY_ADDRESS, %rax
1:      incq (%rax)
        jmp 1b

ap64:
        call load_selectors
        lock incl ap_count(%rip)
        jmp load_cpu

/* Find etc/vmcoreinfo in the fw_cfg file directory and write the note's location into it by DMA. */
publish_vmcoreinfo:
        mov $FW_CFG_SELECTOR, %dx
        mov $FW_CFG_FILE_DIR, %ax
        outw %ax, %dx
        mov $FW_CFG_DATA, %dx
        mov $fw_cfg_entry, %rdi
        mov $4, %ecx
        rep insb
        mov fw_cfg_entry(%rip), %r8d
        bswap %r8d                              /* file count */
1:      test %r8d, %r8d
        jz 3f
        mov $fw_cfg_entry, %rdi
        mov $FW_CFG_FILE_ENTRY, %ecx
        rep insb
        lea fw_cfg_entry + 8(%rip), %rsi
        lea vmcoreinfo_name(%rip), %rdi
        mov $vmcoreinfo_name_end - vmcoreinfo_name, %ecx
        repe cmpsb
        je 2f
        dec %r8d
        jmp 1b
2:      movzwl fw_cfg_entry + 4(%rip), %eax
        xchg %al, %ah                           /* selector, big endian in the directory */
        shl $16, %eax
        or $FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_WRITE, %eax
        bswap %eax
        mov %eax, fw_cfg_dma(%rip)
        movl $0x10000000, fw_cfg_dma + 4(%rip)  /* be32 length 16 */
        mov $vmcoreinfo_content, %rax
        bswap %rax
        mov %rax, fw_cfg_dma + 8(%rip)
        movw $0, vmcoreinfo_content(%rip)                       /* host_format */
        movw $VMCOREINFO_FORMAT_ELF, vmcoreinfo_content + 2(%rip)
        mov IMAGE_BASE + BP_NOTE_SIZE, %eax
        mov %eax, vmcoreinfo_content + 4(%rip)
        mov IMAGE_BASE + BP_NOTE_ADDRESS, %rax
        mov %rax, vmcoreinfo_content + 8(%rip)
        mov $fw_cfg_dma, %rax
        mov %rax, %rcx
        shr $32, %rcx
        bswap %ecx
        bswap %eax
        mov %eax, %esi
        mov %ecx, %eax
        mov $FW_CFG_DMA_HIGH, %dx
        outl %eax, %dx
        mov %esi, %eax
        mov $FW_CFG_DMA_LOW, %dx
        outl %eax, %dx                          /* the low half starts the transfer */
        mov fw_cfg_dma(%rip), %eax
        test %eax, %eax
        jnz 4f
        ret
3:      mov $msg_no_vmcoreinfo, %rsi
        jmp fail
4:      mov $msg_dma_failed, %rsi
        jmp fail

/* Wake every other CPU with INIT-SIPI-SIPI into the trampoline copied below 1 MiB. */
start_aps:
        mov $trampoline, %rsi
        mov $TRAMPOLINE, %rdi
        mov $trampoline_end - trampoline, %ecx
        rep movsb
        mov $LAPIC, %rdi
        movl $0, LAPIC_ICR_HIGH(%rdi)
        movl $ICR_INIT_ALL_BUT_SELF, LAPIC_ICR_LOW(%rdi)
        call wait_icr
        movl $ICR_SIPI_ALL_BUT_SELF | (TRAMPOLINE >> 12), LAPIC_ICR_LOW(%rdi)
        call wait_icr
        movl $ICR_SIPI_ALL_BUT_SELF | (TRAMPOLINE >> 12), LAPIC_ICR_LOW(%rdi)
        call wait_icr
        ret

wait_icr:
1:      pause
        testl $0x1000, LAPIC_ICR_LOW(%rdi)      /* delivery status */
        jnz 1b
        ret

/* The BOOT_CPU record of CPU %ebx (its APIC id) in %r15, after checking the index. */
cpu_record:
        cmp IMAGE_BASE + BP_CPU_COUNT, %ebx
        jb 1f
        mov $msg_bad_apic_id, %rsi
        jmp fail
1:      mov %ebx, %r15d
        shl $9, %r15                            /* * BOOT_CPU_SIZE */
        add $IMAGE_BASE + BP_CPU, %r15
        ret

/* Load CPU %ebx's bases, debug registers, MXCSR and XMM registers from its BOOT_CPU record. */
load_cpu_state:
        call cpu_record
        mov $MSR_FS_BASE, %ecx
        mov CPU_FS_BASE(%r15), %eax
        mov CPU_FS_BASE + 4(%r15), %edx
        wrmsr
        mov $MSR_GS_BASE, %ecx
        mov CPU_GS_BASE(%r15), %eax
        mov CPU_GS_BASE + 4(%r15), %edx
        wrmsr
        mov $MSR_KERNEL_GS_BASE, %ecx
        mov CPU_KERNEL_GS_BASE(%r15), %eax
        mov CPU_KERNEL_GS_BASE + 4(%r15), %edx
        wrmsr
        ldmxcsr CPU_MXCSR(%r15)
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu CPU_XMM + 16 * \n(%r15), %xmm\n
        .endr
        mov CPU_DR + 0(%r15), %rax
        mov %rax, %db0
        mov CPU_DR + 8(%r15), %rax
        mov %rax, %db1
        mov CPU_DR + 16(%r15), %rax
        mov %rax, %db2
        mov CPU_DR + 24(%r15), %rax
        mov %rax, %db3
        mov CPU_DR7(%r15), %rax
        mov %rax, %db7
        ret

/*
 * Load CPU %ebx's whole BOOT_CPU record and halt forever. RFLAGS and the GPRs come from a frame
 * popped off the CPU's own stack: popfq first (TF and IF kept clear), then the GPRs, rsp last.
 */
load_cpu:
        call load_cpu_state
        mov %ebx, %edi
        imul $17 * 8, %rdi
        add $frames, %rdi
        mov CPU_RFLAGS(%r15), %rax
        and $~RFLAGS_TF_IF, %rax
        mov %rax, (%rdi)
        lea 8(%rdi), %rdx
        xor %ecx, %ecx
1:      mov CPU_GPR(%r15, %rcx, 8), %rax
        mov %rax, (%rdx, %rcx, 8)
        inc %ecx
        cmp $16, %ecx
        jne 1b
        mov %rdi, %rsp
        popfq
        pop %rax
        pop %rbx
        pop %rcx
        pop %rdx
        pop %rsi
        pop %rdi
        pop %rbp
        lea 8(%rsp), %rsp                       /* rsp's slot: loaded last */
        pop %r8
        pop %r9
        pop %r10
        pop %r11
        pop %r12
        pop %r13
        pop %r14
        pop %r15
        mov -0x48(%rsp), %rsp
        cli
1:      hlt
        jmp 1b

/* ------------------------------------------------------------------ data */
        .data
        .balign 16
gdt:
        .quad 0                                 /* 0x00 */
        .quad 0x00CF9A000000FFFF                /* 0x08 32-bit code, for the way up */
        .quad 0x00AF9A000000FFFF                /* 0x10 KGDT64_R0_CODE */
        .quad 0x00CF92000000FFFF                /* 0x18 KGDT64_R0_DATA */
        .quad 0x00CFFA000000FFFF                /* 0x20 KGDT64_R3_CMCODE */
        .quad 0x00CFF2000000FFFF                /* 0x28 KGDT64_R3_DATA */
        .quad 0x00AFFA000000FFFF                /* 0x30 KGDT64_R3_CODE */
        .quad 0                                 /* 0x38 */
        .quad 0, 0                              /* 0x40 KGDT64_SYS_TSS (unused) */
        .quad 0x00CFF2000000FFFF                /* 0x50 KGDT64_R3_CMTEB */
gdt_end:
        .balign 8
        .word 0
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt

vmcoreinfo_name:
        .asciz "etc/vmcoreinfo"
vmcoreinfo_name_end:
msg_boot:          .asciz "WINDUMP-BOOT\n"
msg_stamped:       .asciz "WINDUMP-STAMPED\n"
msg_published:     .asciz "WINDUMP-PUBLISHED\n"
msg_ready:         .asciz "WINDUMP-READY\n"
msg_bad_magic:     .asciz "WINDUMP-FAIL BOOT_PARAMS.Magic is not WDBOOT01 at IMAGE_BASE\n"
msg_bad_stamps:    .asciz "WINDUMP-FAIL StampRangeCount exceeds MAX_STAMP_RANGES\n"
msg_bad_cpus:      .asciz "WINDUMP-FAIL CpuCount exceeds MAX_CPUS\n"
msg_bad_apic_id:   .asciz "WINDUMP-FAIL a CPU's APIC id is not below CpuCount\n"
msg_no_vmcoreinfo: .asciz "WINDUMP-FAIL fw_cfg has no etc/vmcoreinfo (start QEMU with -device vmcoreinfo)\n"
msg_dma_failed:    .asciz "WINDUMP-FAIL the fw_cfg DMA write of etc/vmcoreinfo failed\n"

        .bss
        .balign 4096
stacks:
        .skip STACK_SIZE * MAX_CPUS
frames:
        .skip 17 * 8 * MAX_CPUS
        .balign 16
fw_cfg_dma:
        .skip 16
vmcoreinfo_content:
        .skip 16
fw_cfg_entry:
        .skip FW_CFG_FILE_ENTRY
ap_count:
        .long 0
