/*
 * Entry points of the Hive test guest.
 *
 * Two ways in, so one ELF exercises both boot paths of the VMM (and QEMU microvm):
 *  - pvh_start32: the PVH entry named by the XEN_ELFNOTE_PHYS32_ENTRY note. 32-bit protected
 *    mode, paging off, %ebx = physical address of hvm_start_info.
 *  - _start64 (the ELF entry): the Linux 64-bit boot protocol. Long mode with the loader's
 *    identity page tables, %rsi = physical address of boot_params (the zero page).
 * Both build the guest's own identity map (2 MiB pages) of GiB 0 and GiB 3 so RAM and the
 * virtio-mmio windows are reachable, then call guest_main(protocol, info). The page-table pages
 * are NOLOAD and only the entries for GiB 0 and 3 (low dwords, on the 32-bit path) are written:
 * this relies on fresh guest RAM being zero, which holds for our VMM and for QEMU.
 * Only plain integer instructions: the nested KVM here cannot emulate much else after an exit.
 */

#define PTE_PRESENT_RW 0x3
#define PDE_LARGE      0x83

	.section .note.pvh, "a"
	.balign 4
	.long 4                 /* n_namesz: "Xen\0" */
	.long 4                 /* n_descsz: a 32-bit entry address */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start32

	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl %ebx, boot_info
	movl $1, boot_protocol
	movl $stack_top, %esp

	/*
	 * Two page directories of 512 x 2 MiB: GiB 0 (RAM) and GiB 3 (the virtio-mmio windows of
	 * our VMM at 0xd0000000 and QEMU microvm at 0xfeb00000). Every instruction counts: the
	 * nested KVM here runs this code at roughly a microsecond per instruction.
	 */
	movl $pd_tables, %edi
	movl $PDE_LARGE, %eax
	movl $0xc0000000 + PDE_LARGE, %ebx
	movl $512, %ecx
1:	movl %eax, (%edi)               /* high dwords: zero in fresh RAM */
	movl %ebx, 4096(%edi)
	addl $0x200000, %eax
	addl $0x200000, %ebx
	addl $8, %edi
	decl %ecx
	jnz 1b

	/* PDPT[0] -> first PD, PDPT[3] -> second PD */
	movl $pd_tables + PTE_PRESENT_RW, pdpt
	movl $pd_tables + 4096 + PTE_PRESENT_RW, pdpt + 24

	movl $pdpt + PTE_PRESENT_RW, pml4

	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx          /* EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG | PE */
	movl %eax, %cr0
	lgdt gdt_desc
	ljmp $0x08, $pvh_long

	.code64
pvh_long:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $stack_top, %rsp
	movl boot_protocol(%rip), %edi
	movl boot_info(%rip), %esi
	call guest_main
	jmp halt_forever

	.globl _start64
_start64:
	cli
	cld
	movq %rsi, %r12
	movq $stack_top, %rsp

	movq $pd_tables, %rdi
	movq $PDE_LARGE, %rax
	movq $0xc0000000 + PDE_LARGE, %rbx
	movl $512, %ecx
3:	movq %rax, (%rdi)
	movq %rbx, 4096(%rdi)
	addq $0x200000, %rax
	addq $0x200000, %rbx
	addq $8, %rdi
	decl %ecx
	jnz 3b

	movq $pd_tables + PTE_PRESENT_RW, %rax
	movq %rax, pdpt(%rip)
	movq $pd_tables + 4096 + PTE_PRESENT_RW, %rax
	movq %rax, pdpt + 24(%rip)
	movq $pdpt + PTE_PRESENT_RW, %rax
	movq %rax, pml4(%rip)

	movq $pml4, %rax
	movq %rax, %cr3
	xorl %edi, %edi                 /* protocol 0: Linux boot_params */
	movq %r12, %rsi
	call guest_main

	.globl halt_forever
halt_forever:
	cli
	hlt
	jmp halt_forever

	.section .rodata
	.balign 16
gdt:
	.quad 0
	.quad 0x00af9b000000ffff        /* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff        /* 0x10: data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.section .data
	.balign 4
boot_info:	.long 0
boot_protocol:	.long 0

	.section .pagetables, "aw", @nobits
	.balign 4096
pml4:		.skip 4096
pdpt:		.skip 4096
pd_tables:	.skip 4096 * 2

	.section .stack, "aw", @nobits
	.balign 16
	.skip 32768
stack_top:
