"""C declarations of the KVM userspace ABI (linux/kvm.h, asm/kvm.h) for cffi.

One text serves both cffi modes: the API-mode build (hvm/kvm/_build.py) compiles it
against the real <linux/kvm.h>, so cffi checks every field offset and struct size
against the kernel headers; the ABI-mode fallback uses the same text unchanged.
Only the members hvm uses are named inside kvm_run's exit union; the 256-byte
padding member keeps the union's size exact.
"""

CDEF = r"""
struct kvm_userspace_memory_region {
    unsigned int slot;
    unsigned int flags;
    unsigned long long guest_phys_addr;
    unsigned long long memory_size;
    unsigned long long userspace_addr;
};

struct kvm_regs {
    unsigned long long rax, rbx, rcx, rdx;
    unsigned long long rsi, rdi, rsp, rbp;
    unsigned long long r8, r9, r10, r11;
    unsigned long long r12, r13, r14, r15;
    unsigned long long rip, rflags;
};

struct kvm_segment {
    unsigned long long base;
    unsigned int limit;
    unsigned short selector;
    unsigned char type;
    unsigned char present, dpl, db, s, l, g, avl;
    unsigned char unusable;
    unsigned char padding;
};

struct kvm_dtable {
    unsigned long long base;
    unsigned short limit;
    unsigned short padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    unsigned long long cr0, cr2, cr3, cr4, cr8;
    unsigned long long efer;
    unsigned long long apic_base;
    unsigned long long interrupt_bitmap[4];
};

struct kvm_fpu {
    unsigned char fpr[8][16];
    unsigned short fcw;
    unsigned short fsw;
    unsigned char ftwx;
    unsigned char pad1;
    unsigned short last_opcode;
    unsigned long long last_ip;
    unsigned long long last_dp;
    unsigned char xmm[16][16];
    unsigned int mxcsr;
    unsigned int pad2;
};

struct kvm_msr_entry {
    unsigned int index;
    unsigned int reserved;
    unsigned long long data;
};

struct kvm_msrs {
    unsigned int nmsrs;
    unsigned int pad;
    struct kvm_msr_entry entries[];
};

struct kvm_cpuid_entry2 {
    unsigned int function;
    unsigned int index;
    unsigned int flags;
    unsigned int eax;
    unsigned int ebx;
    unsigned int ecx;
    unsigned int edx;
    unsigned int padding[3];
};

struct kvm_cpuid2 {
    unsigned int nent;
    unsigned int padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_pit_config {
    unsigned int flags;
    unsigned int pad[15];
};

struct kvm_ioeventfd {
    unsigned long long datamatch;
    unsigned long long addr;
    unsigned int len;
    int fd;
    unsigned int flags;
    unsigned char pad[36];
};

struct kvm_irq_level {
    union {
        unsigned int irq;
        int status;
    };
    unsigned int level;
};

struct kvm_pic_state {
    unsigned char last_irr;
    unsigned char irr;
    unsigned char imr;
    unsigned char isr;
    unsigned char priority_add;
    unsigned char irq_base;
    unsigned char read_reg_select;
    unsigned char poll;
    unsigned char special_mask;
    unsigned char init_state;
    unsigned char auto_eoi;
    unsigned char rotate_on_auto_eoi;
    unsigned char special_fully_nested_mode;
    unsigned char init4;
    unsigned char elcr;
    unsigned char elcr_mask;
};

struct kvm_ioapic_state {
    unsigned long long base_address;
    unsigned int ioregsel;
    unsigned int id;
    unsigned int irr;
    unsigned int pad;
    union {
        unsigned long long bits;
    } redirtbl[24];
};

struct kvm_irqchip {
    unsigned int chip_id;
    unsigned int pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_pit_channel_state {
    unsigned int count;
    unsigned short latched_count;
    unsigned char count_latched;
    unsigned char status_latched;
    unsigned char status;
    unsigned char read_state;
    unsigned char write_state;
    unsigned char write_latch;
    unsigned char rw_mode;
    unsigned char mode;
    unsigned char bcd;
    unsigned char gate;
    long long count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    unsigned int flags;
    unsigned int reserved[9];
};

struct kvm_mp_state {
    unsigned int mp_state;
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_vcpu_events {
    struct {
        unsigned char injected;
        unsigned char nr;
        unsigned char has_error_code;
        unsigned char pending;
        unsigned int error_code;
    } exception;
    struct {
        unsigned char injected;
        unsigned char nr;
        unsigned char soft;
        unsigned char shadow;
    } interrupt;
    struct {
        unsigned char injected;
        unsigned char pending;
        unsigned char masked;
        unsigned char pad;
    } nmi;
    unsigned int sipi_vector;
    unsigned int flags;
    struct {
        unsigned char smm;
        unsigned char pending;
        unsigned char smm_inside_nmi;
        unsigned char latched_init;
    } smi;
    struct {
        unsigned char pending;
    } triple_fault;
    unsigned char reserved[26];
    unsigned char exception_has_payload;
    unsigned long long exception_payload;
};

struct kvm_msr_list {
    unsigned int nmsrs;
    unsigned int indices[];
};

struct kvm_debugregs {
    unsigned long long db[4];
    unsigned long long dr6;
    unsigned long long dr7;
    unsigned long long flags;
    unsigned long long reserved[9];
};

struct kvm_xsave {
    unsigned int region[1024];
    unsigned int extra[];
};

struct kvm_translation {
    unsigned long long linear_address;
    unsigned long long physical_address;
    unsigned char valid;
    unsigned char writeable;
    unsigned char usermode;
    unsigned char pad[5];
};

struct kvm_xcr {
    unsigned int xcr;
    unsigned int reserved;
    unsigned long long value;
};

struct kvm_xcrs {
    unsigned int nr_xcrs;
    unsigned int flags;
    struct kvm_xcr xcrs[16];
    unsigned long long padding[16];
};

struct kvm_clock_data {
    unsigned long long clock;
    unsigned int flags;
    unsigned int pad0;
    unsigned long long realtime;
    unsigned long long host_tsc;
    unsigned int pad[4];
};

struct kvm_run {
    unsigned char request_interrupt_window;
    unsigned char immediate_exit;
    unsigned char padding1[6];
    unsigned int exit_reason;
    unsigned char ready_for_interrupt_injection;
    unsigned char if_flag;
    unsigned short flags;
    unsigned long long cr8;
    unsigned long long apic_base;
    union {
        struct {
            unsigned long long hardware_exit_reason;
        } hw;
        struct {
            unsigned long long hardware_entry_failure_reason;
            unsigned int cpu;
        } fail_entry;
        struct {
            unsigned int exception;
            unsigned int error_code;
        } ex;
        struct {
            unsigned char direction;
            unsigned char size;
            unsigned short port;
            unsigned int count;
            unsigned long long data_offset;
        } io;
        struct {
            unsigned long long phys_addr;
            unsigned char data[8];
            unsigned int len;
            unsigned char is_write;
        } mmio;
        struct {
            unsigned int suberror;
            unsigned int ndata;
            unsigned long long data[16];
        } internal;
        struct {
            unsigned int type;
            unsigned int ndata;
            unsigned long long data[16];
        } system_event;
        char padding[256];
    };
    unsigned long long kvm_valid_regs;
    unsigned long long kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};

int ioctl(int fd, unsigned long request, void *arg);
"""

# Declared only by the compiled (API-mode) module: a do-nothing signal handler installed
# from C, so a signal can interrupt KVM_RUN in any thread without running Python code.
CDEF_API_ONLY = r"""
int hvm_install_kick_handler(int signo);
int hvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
"""

SOURCE = r"""
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static void hvm_kick(int signo) { (void)signo; }

static int hvm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hvm_kick;   /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL);
}

static int hvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}
"""
