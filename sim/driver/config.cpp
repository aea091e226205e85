// The simulated machine's shape, from the environment: NC_SIM_DEVICES (default 1), NC_SIM_MEM (bytes per
// device, default 4G; K, M, G suffixes are powers of 1024), NC_SIM_RACE=1 (race mode), NC_SIM_TRACE=FILE, and the
// planted bugs that show the checks work: NC_SIM_PLANT_SKIP_SYNCTHREADS=N; fault injection (inject.cpp):
// NC_SIM_FAIL_ALLOC=N[@D], NC_SIM_FAULT_KERNEL=NAME:N[@D].
#include "state.h"
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace sim {

static Config g_config;

const Config& config() { return g_config; }

// "4G", "512M", "1048576": bytes; false on anything else.
static bool parse_size(const char* text, size_t& out) {
    char* end = nullptr;
    errno = 0;
    unsigned long long value = std::strtoull(text, &end, 10);
    if (end == text || errno != 0 || text[0] == '-') return false;
    unsigned long long scale = 1;
    if (*end == 'K' || *end == 'k') scale = 1ull << 10, end++;
    else if (*end == 'M' || *end == 'm') scale = 1ull << 20, end++;
    else if (*end == 'G' || *end == 'g') scale = 1ull << 30, end++;
    if (*end != '\0' || value == 0 || value > (1ull << 50) / scale) return false;
    out = value * scale;
    return true;
}

// "N" or "N@D": a count from 1 and an optional device (-1 when absent); false on anything else.
static bool parse_count_at_device(const char* text, uint64_t& count, int& device) {
    char* end = nullptr;
    errno = 0;
    unsigned long long n = std::strtoull(text, &end, 10);
    if (end == text || errno != 0 || text[0] == '-' || n == 0) return false;
    device = -1;
    if (*end == '@') {
        const char* d = end + 1;
        long v = std::strtol(d, &end, 10);
        if (end == d || v < 0 || v >= kMaxDevices) return false;
        device = int(v);
    }
    count = n;
    return *end == '\0';
}

// The fault injection variables (inject.cpp).
static bool load_injection(Config& c) {
    if (const char* a = std::getenv("NC_SIM_FAIL_ALLOC"); a && *a) {
        if (!parse_count_at_device(a, c.fail_alloc_at, c.fail_alloc_device)) {
            say("NC_SIM_FAIL_ALLOC='%s': give N or N@DEVICE, the first cuMemAlloc (counting from 1) that fails with "
                "out of memory, on DEVICE or any device (e.g. 40 or 40@1), or leave it unset", a);
            return false;
        }
    }
    if (const char* k = std::getenv("NC_SIM_FAULT_KERNEL"); k && *k) {
        const char* colon = std::strrchr(k, ':');
        if (!colon || colon == k || !parse_count_at_device(colon + 1, c.fault_kernel_at, c.fault_kernel_device)) {
            say("NC_SIM_FAULT_KERNEL='%s': give KERNEL:N or KERNEL:N@DEVICE, the launch (counting from 1) of the "
                "kernel that faults, on DEVICE or any device (e.g. nc_adamw_f32:3@1), or leave it unset", k);
            return false;
        }
        c.fault_kernel.assign(k, colon);
    }
    return true;
}

bool load_config(Config& out) {
    Config c;
    if (const char* d = std::getenv("NC_SIM_DEVICES"); d && *d) {
        char* end = nullptr;
        long n = std::strtol(d, &end, 10);
        if (*end != '\0' || n < 1 || n > kMaxDevices) {
            say("NC_SIM_DEVICES='%s' is not a device count: give a number from 1 to 16 (default 1)", d);
            return false;
        }
        c.devices = int(n);
    }
    if (const char* m = std::getenv("NC_SIM_MEM"); m && *m) {
        if (!parse_size(m, c.mem_bytes) || c.mem_bytes < (1u << 20)) {
            say("NC_SIM_MEM='%s' is not a memory size: give bytes per device, at least 1M, optionally with a "
                "K, M or G suffix (e.g. 4G, the default)", m);
            return false;
        }
    }
    if (const char* r = std::getenv("NC_SIM_RACE"); r && *r) {
        if (std::strcmp(r, "1") != 0 && std::strcmp(r, "0") != 0) {
            say("NC_SIM_RACE='%s': set it to 1 (race mode) or 0 / unset (off)", r);
            return false;
        }
        c.race = r[0] == '1';
    }
    if (const char* t = std::getenv("NC_SIM_TRACE"); t && *t) c.trace_path = t;
    // A planted bug, for the race checker's own test (tests/tests/sim_driver.rs): the N-th (0-based) __syncthreads
    // of every thread of every kernel does nothing. The emulator reads the variable itself (kernel_registry.h sets
    // emu_plant_skip_syncthreads when a module registers, before cuInit); here a bad value is refused.
    if (const char* p = std::getenv("NC_SIM_PLANT_SKIP_SYNCTHREADS"); p && *p) {
        char* end = nullptr;
        long n = std::strtol(p, &end, 10);
        if (*end != '\0' || n < 0 || n > 1000000) {
            say("NC_SIM_PLANT_SKIP_SYNCTHREADS='%s': give the 0-based index of the __syncthreads every thread skips "
                "(a planted bug for testing the race checker), or leave it unset", p);
            return false;
        }
        c.plant_skip_syncthreads = int(n);
    }
    if (!load_injection(c)) return false;
    g_config = c;
    out = c;
    return true;
}

}  // namespace sim
