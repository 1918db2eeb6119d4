/*
 * vmm-save.c - a small program that plays a VMM to show the save path.
 *
 *   vmm-save [DIR]
 *
 * Phase 1 (this process): create a disk image, write guest data through
 * the block API, save a checkpoint holding a memory section and a
 * device-state section next to the disk state, then keep running and
 * writing.  Phase 2 (a new process, as a VMM restarted from the
 * checkpoint would be): apply the checkpoint, read the memory and device
 * state back and verify them and the disk byte for byte.
 *
 * Build: cc vmm-save.c $(pkg-config --cflags --libs libqsnap)
 */
#include <qsnap.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define DISK_SIZE (64u << 20)
#define MEM_SIZE (32u << 20)
#define PAGE 4096u

static const char device_state[] =
    "{\"cpus\":[{\"id\":0,\"rip\":\"0xffffffff81000000\"}],"
    "\"devices\":[{\"id\":\"virtio-blk0\",\"queue\":3}]}";

static int fail(const char *what, qsnap_image *img, int ret)
{
    fprintf(stderr, "vmm-save: %s: %s (%s)\n", what, qsnap_strerror(ret),
            img ? qsnap_errmsg(img) : "");
    return 1;
}

/* Guest RAM: mostly zero pages, every 16th page filled with a pattern. */
static void make_memory(uint8_t *mem)
{
    memset(mem, 0, MEM_SIZE);
    for (uint32_t p = 0; p < MEM_SIZE / PAGE; p += 16) {
        for (uint32_t i = 0; i < PAGE; i++) {
            mem[(size_t)p * PAGE + i] = (uint8_t)(p * 31 + i);
        }
    }
}

static void fill(uint8_t *buf, size_t len, uint8_t seed)
{
    for (size_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(seed + i * 7);
    }
}

static int open_rw(const char *path, qsnap_image **img)
{
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_RDWR;
    char err[512];
    int ret = qsnap_open(path, &o, img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "vmm-save: %s\n", err);
    }
    return ret;
}

static int save(const char *path)
{
    struct qsnap_create_opts co;
    qsnap_create_opts_init(&co);
    co.size = DISK_SIZE;
    char err[512];
    int ret = qsnap_create(path, &co, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "vmm-save: %s\n", err);
        return 1;
    }
    qsnap_image *img;
    if (open_rw(path, &img) < 0) {
        return 1;
    }
    uint8_t *buf = malloc(1u << 20);
    uint8_t *mem = malloc(MEM_SIZE);
    if (!buf || !mem) {
        return 1;
    }

    /* The guest writes its disk. */
    fill(buf, 1u << 20, 1);
    for (uint64_t off = 0; off < 8u << 20; off += 1u << 20) {
        if ((ret = qsnap_pwrite(img, buf, 1u << 20, off)) < 0) {
            return fail("guest write", img, ret);
        }
    }

    /* Pause, save memory and devices with the disk in one checkpoint. */
    qsnap_checkpoint *ck;
    struct qsnap_snapshot_opts so;
    qsnap_snapshot_opts_init(&so);
    so.vm_clock_ns = 12345678900ull;
    ret = qsnap_checkpoint_begin(img, "ckpt1", &so, QSNAP_CHECKPOINT_SECTIONS,
                                 &ck);
    if (ret < 0) {
        return fail("checkpoint begin", img, ret);
    }
    make_memory(mem);
    if ((ret = qsnap_checkpoint_section_begin(ck, "memory")) < 0 ||
        (ret = qsnap_checkpoint_section_write(ck, mem, MEM_SIZE)) < 0 ||
        (ret = qsnap_checkpoint_section_end(ck)) < 0 ||
        (ret = qsnap_checkpoint_section_begin(ck, "state")) < 0 ||
        (ret = qsnap_checkpoint_section_write(ck, device_state,
                                              sizeof(device_state))) < 0 ||
        (ret = qsnap_checkpoint_section_end(ck)) < 0) {
        qsnap_checkpoint_abort(ck);
        return fail("checkpoint sections", img, ret);
    }
    if ((ret = qsnap_checkpoint_commit(ck)) < 0) {
        return fail("checkpoint commit", img, ret);
    }

    /* Resume: the guest keeps writing after the checkpoint. */
    fill(buf, 1u << 20, 99);
    for (uint64_t off = 4u << 20; off < 12u << 20; off += 1u << 20) {
        if ((ret = qsnap_pwrite(img, buf, 1u << 20, off)) < 0) {
            return fail("guest write after checkpoint", img, ret);
        }
    }
    if ((ret = qsnap_close(img)) < 0) {
        return fail("close", NULL, ret);
    }
    free(buf);
    free(mem);
    printf("saved checkpoint ckpt1 in %s and kept running\n", path);
    return 0;
}

static int restore(const char *path)
{
    qsnap_image *img;
    if (open_rw(path, &img) < 0) {
        return 1;
    }
    int ret = qsnap_snapshot_apply(img, "ckpt1");
    if (ret < 0) {
        return fail("apply", img, ret);
    }
    qsnap_vmstate *vs;
    if ((ret = qsnap_vmstate_open(img, "ckpt1", &vs)) < 0) {
        return fail("vmstate open", img, ret);
    }
    uint8_t *mem = malloc(MEM_SIZE), *want = malloc(MEM_SIZE);
    uint8_t *buf = malloc(1u << 20), *exp = malloc(1u << 20);
    char state[sizeof(device_state)];
    if (!mem || !want || !buf || !exp) {
        return 1;
    }
    make_memory(want);
    if ((ret = qsnap_vmstate_section_pread(vs, "memory", mem, MEM_SIZE, 0)) <
            0 ||
        (ret = qsnap_vmstate_section_pread(vs, "state", state, sizeof(state),
                                           0)) < 0) {
        return fail("vmstate read", img, ret);
    }
    qsnap_vmstate_close(vs);
    if (memcmp(mem, want, MEM_SIZE) != 0 ||
        memcmp(state, device_state, sizeof(state)) != 0) {
        fprintf(stderr, "vmm-save: restored VM state differs\n");
        return 1;
    }
    /* The disk is as it was at the checkpoint: 8 MiB of data, then 0. */
    fill(exp, 1u << 20, 1);
    for (uint64_t off = 0; off < 16u << 20; off += 1u << 20) {
        if ((ret = qsnap_pread(img, buf, 1u << 20, off)) < 0) {
            return fail("disk read", img, ret);
        }
        if (off >= 8u << 20) {
            memset(exp, 0, 1u << 20);
        }
        if (memcmp(buf, exp, 1u << 20) != 0) {
            fprintf(stderr, "vmm-save: disk differs at %llu\n",
                    (unsigned long long)off);
            return 1;
        }
    }
    if ((ret = qsnap_close(img)) < 0) {
        return fail("close", NULL, ret);
    }
    free(mem);
    free(want);
    free(buf);
    free(exp);
    printf("restored ckpt1 in a new process: memory, device state and "
           "disk verified\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--restore") == 0) {
        return restore(argv[2]);
    }
    char dir[] = "/tmp/vmm-save.XXXXXX";
    const char *base = argc > 1 ? argv[1] : mkdtemp(dir);
    if (!base) {
        perror("mkdtemp");
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/vm.qcow2", base);
    int ret = save(path);
    fflush(stdout);
    if (ret == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            execl("/proc/self/exe", argv[0], "--restore", path,
                  (char *)NULL);
            perror("exec");
            _exit(127);
        }
        int status;
        ret = pid > 0 && waitpid(pid, &status, 0) == pid &&
                      WIFEXITED(status) && WEXITSTATUS(status) == 0
                  ? 0
                  : 1;
    }
    unlink(path);
    if (argc == 1) {
        rmdir(base);
    }
    return ret;
}
