/*
 * /init of build/linux/initramfs-ud2.cpio: a static x86-64 ELF whose very
 * first instruction is ud2. Reaching it proves the kernel got to user space
 * without any system call working: the kernel then reports init killed by
 * SIGILL ("Attempted to kill init! exitcode=0x00000004").
 */
	.text
	.globl	_start
	.type	_start, @function
_start:
	ud2
	.size	_start, . - _start
	.section .note.GNU-stack, "", @progbits
