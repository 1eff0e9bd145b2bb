/* cref: the C reference VMM of hvm's benchmark suite (bench/, `make bench`).
 *
 * The smallest VMM that can run the bench_* guest loops: open /dev/kvm, create a VM, one memory
 * slot at guest-physical 0, one vCPU in real or flat 32-bit protected mode (the same CPU state hvm's
 * loader gives a flat image: GDT at 0x500, CS=0x10, DS=0x18, CR0.PE|ET), then KVM_RUN in a loop that
 * counts exits. No devices, except: a write to the debug-exit port 0xf4 ends the run, and port 0x3ff
 * (COM1's scratch register) is a one-byte register, the "trivial device" of the device benchmark; an
 * IN from 0x3fd (COM1's line status) reads 0x60, THR and transmitter empty, as hvm's idle UART answers
 * (exit.pio_lsr). An IN from any other port reads all ones; MMIO writes are dropped, reads return all ones.
 * HLT (no irqchip, so it exits here) is counted and the guest is entered again after it.
 *
 * Usage: cref [-m real|protected] [-l LOAD] [-M MiB] [-t SECONDS] IMAGE
 * Prints one JSON object: exit counts by reason, the seconds from the first KVM_RUN to the
 * debug-exit write (CLOCK_MONOTONIC) and the CPU time spent meanwhile (CLOCK_PROCESS_CPUTIME_ID),
 * and the value written there.
 * Exit status 0 after a debug-exit, 124 on timeout (SIGALRM), 1 on any error or unexpected exit. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4
#define SCRATCH_PORT 0x3ff
#define LSR_PORT 0x3fd
#define LSR_IDLE 0x60                   /* THRE | TEMT: nothing received, nothing to send */
#define GDT_ADDR 0x500
#define TSS_ADDR 0xfeffd000UL           /* the addresses hvm gives KVM */
#define IDENTITY_MAP_ADDR 0xfeffc000ULL

static volatile sig_atomic_t timed_out;
static struct kvm_run *run;

static void die(const char *what)
{
    fprintf(stderr, "cref: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void on_alarm(int sig)
{
    (void)sig;
    timed_out = 1;
    if (run)
        run->immediate_exit = 1;    /* covers an alarm that lands just before KVM_RUN */
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void)     /* this process's CPU time, user + system */
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t gdt_entry(uint64_t base, uint64_t limit, uint64_t flags)
{
    return ((base & 0xff000000ULL) << 32) | ((flags & 0xf0ffULL) << 40) | ((limit & 0xf0000ULL) << 32) |
           ((base & 0x00ffffffULL) << 16) | (limit & 0xffffULL);
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = selector;
    s->type = type;
    s->present = 1;
    s->dpl = 0;
    s->db = 1;
    s->s = 1;
    s->l = 0;
    s->g = 1;
}

static void real_segment(struct kvm_segment *s, uint16_t selector, uint8_t type)
{
    memset(s, 0, sizeof *s);
    s->base = (uint64_t)selector << 4;
    s->limit = 0xffff;
    s->selector = selector;
    s->type = type;
    s->present = 1;
    s->s = 1;
}

int main(int argc, char **argv)
{
    const char *mode = "real";
    uint64_t load = 0, mem_mib = 16;
    unsigned timeout = 30;
    int opt;
    while ((opt = getopt(argc, argv, "m:l:M:t:")) != -1) {
        switch (opt) {
        case 'm': mode = optarg; break;
        case 'l': load = strtoull(optarg, NULL, 0); break;
        case 'M': mem_mib = strtoull(optarg, NULL, 0); break;
        case 't': timeout = (unsigned)strtoul(optarg, NULL, 0); break;
        default:
            fprintf(stderr, "usage: cref [-m real|protected] [-l LOAD] [-M MiB] [-t SECONDS] IMAGE\n");
            return 1;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: cref [-m real|protected] [-l LOAD] [-M MiB] [-t SECONDS] IMAGE\n");
        return 1;
    }
    int protected_mode = strcmp(mode, "protected") == 0;
    if (!protected_mode && strcmp(mode, "real") != 0) {
        fprintf(stderr, "cref: mode must be real or protected\n");
        return 1;
    }
    if (!load)
        load = protected_mode ? 0x100000 : 0x7c00;
    uint64_t mem_size = mem_mib << 20;

    /* The guest image. */
    int img = open(argv[optind], O_RDONLY | O_CLOEXEC);
    if (img < 0)
        die(argv[optind]);
    struct stat st;
    if (fstat(img, &st) < 0)
        die("fstat");
    if (load + (uint64_t)st.st_size > mem_size) {
        fprintf(stderr, "cref: image does not fit in guest memory\n");
        return 1;
    }

    /* KVM: system, VM, memory, vCPU. */
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        fprintf(stderr, "cref: unexpected KVM API version\n");
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &(uint64_t){IDENTITY_MAP_ADDR}) < 0)
        die("KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");

    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    for (off_t done = 0; done < st.st_size;) {
        ssize_t n = pread(img, mem + load + done, st.st_size - done, done);
        if (n <= 0)
            die("read image");
        done += n;
    }
    close(img);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    /* KVM's supported CPUID, as every VMM sets it (hvm does too). */
    int ncpuid = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + ncpuid * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = ncpuid;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");
    free(cpuid);

    /* CPU state: the same hvm's flat loader produces. */
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rflags = 2;
    regs.rsp = 0x7000;
    if (protected_mode) {
        uint64_t gdt[4] = {0, 0, gdt_entry(0, 0xfffff, 0xc09b), gdt_entry(0, 0xfffff, 0xc093)};
        memcpy(mem + GDT_ADDR, gdt, sizeof gdt);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = sizeof gdt - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        flat_segment(&sregs.cs, 0x10, 0xb);
        flat_segment(&sregs.ds, 0x18, 0x3);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.cr0 = 0x11;               /* PE | ET */
        sregs.cr3 = sregs.cr4 = sregs.efer = 0;
        regs.rip = load;
    } else {
        uint16_t cs = load < 0x10000 ? 0 : (load >> 4) & 0xf000;
        real_segment(&sregs.cs, cs, 0xb);
        real_segment(&sregs.ds, 0, 0x3);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.cr0 = 0x10;               /* ET */
        regs.rip = load - ((uint64_t)cs << 4);
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    /* Bound the run: SIGALRM interrupts KVM_RUN (no SA_RESTART) and stops the loop. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, NULL) < 0)
        die("sigaction");
    alarm(timeout);

    /* The loop. */
    uint64_t counts[64] = {0};
    uint64_t io_out = 0, io_in = 0, mmio_w = 0, mmio_r = 0;
    uint8_t scratch = 0;
    int debug_exit = 0, exit_value = -1, status = 1;
    const char *why = "";
    double c0 = cpu_now();
    double t0 = now(), t1 = t0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (timed_out) {
                    t1 = now();
                    why = "timeout";
                    status = 124;
                    break;
                }
                run->immediate_exit = 0;
                continue;
            }
            die("KVM_RUN");
        }
        uint32_t reason = run->exit_reason;
        counts[reason < 64 ? reason : 63]++;
        if (reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t bytes = run->io.size * run->io.count;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                io_out++;
                if (run->io.port == DEBUG_EXIT_PORT) {
                    t1 = now();
                    uint32_t v = 0;
                    memcpy(&v, data, run->io.size < 4 ? run->io.size : 4);
                    exit_value = (int)v;
                    debug_exit = 1;
                    status = 0;
                    why = "debug-exit";
                    break;
                }
                if (run->io.port == SCRATCH_PORT)
                    scratch = data[bytes - 1];
            } else {
                io_in++;
                if (run->io.port == SCRATCH_PORT && run->io.size == 1)
                    memset(data, scratch, bytes);
                else if (run->io.port == LSR_PORT && run->io.size == 1)
                    memset(data, LSR_IDLE, bytes);
                else
                    memset(data, 0xff, bytes);
            }
        } else if (reason == KVM_EXIT_MMIO) {
            if (run->mmio.is_write) {
                mmio_w++;
            } else {
                mmio_r++;
                memset(run->mmio.data, 0xff, run->mmio.len);
            }
        } else if (reason == KVM_EXIT_HLT) {
            /* no irqchip: the VMM sees every HLT; carry on after it */
        } else if (reason == KVM_EXIT_INTR) {
            /* a signal interrupted the guest; the loop checks timed_out above */
            if (timed_out) {
                t1 = now();
                why = "timeout";
                status = 124;
                break;
            }
        } else {
            t1 = now();
            fprintf(stderr, "cref: unexpected exit reason %u\n", reason);
            why = "unexpected-exit";
            status = 1;
            break;
        }
    }
    double c1 = cpu_now();
    alarm(0);

    printf("{\"vmm\": \"cref\", \"mode\": \"%s\", \"end\": \"%s\", \"debug_exit\": %s, \"exit_value\": %d, "
           "\"seconds\": %.9f, \"cpu_seconds\": %.9f, \"exits\": {\"total\": %llu, \"io\": %llu, \"io_out\": %llu, \"io_in\": %llu, "
           "\"mmio\": %llu, \"mmio_write\": %llu, \"mmio_read\": %llu, \"hlt\": %llu, \"intr\": %llu}}\n",
           mode, why, debug_exit ? "true" : "false", exit_value, t1 - t0, c1 - c0,
           (unsigned long long)(counts[KVM_EXIT_IO] + counts[KVM_EXIT_MMIO] + counts[KVM_EXIT_HLT] +
                                counts[KVM_EXIT_INTR]),
           (unsigned long long)counts[KVM_EXIT_IO], (unsigned long long)io_out, (unsigned long long)io_in,
           (unsigned long long)counts[KVM_EXIT_MMIO], (unsigned long long)mmio_w, (unsigned long long)mmio_r,
           (unsigned long long)counts[KVM_EXIT_HLT], (unsigned long long)counts[KVM_EXIT_INTR]);
    munmap(run, run_size);
    close(vcpu);
    munmap(mem, mem_size);
    close(vm);
    close(kvm);
    return status;
}
