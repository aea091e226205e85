// The fake ncsim of fake_ncsim.h (tests only; see there).
#include "fake_ncsim.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Access {
    const void* ptr;
    size_t bytes;
    int is_write;
};

struct Work {
    void (*fn)(void*);
    void* ctx;
};

std::mutex mutex;
std::map<uintptr_t, size_t> allocations;
std::deque<Work> queue;
std::vector<Access> declared, last_accesses;
std::vector<std::string> trace_lines;
void* last_stream = nullptr;
int violations = 0;

}  // namespace

EXPORT void* fake_alloc(size_t bytes) {
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    std::memset(p, 0xff, bytes);
    std::lock_guard<std::mutex> lock(mutex);
    allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
    return p;
}

EXPORT void fake_free(void* ptr) {
    {
        std::lock_guard<std::mutex> lock(mutex);
        allocations.erase(reinterpret_cast<uintptr_t>(ptr));
    }
    std::free(ptr);
}

EXPORT int fake_sync(void) {
    int ran = 0;
    for (;;) {
        Work w;
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (queue.empty()) return ran;
            w = queue.front();
            queue.pop_front();
        }
        w.fn(w.ctx);
        ran++;
    }
}

EXPORT int fake_pending(void) {
    std::lock_guard<std::mutex> lock(mutex);
    return int(queue.size());
}

EXPORT int fake_violations(void) {
    return violations;
}

EXPORT int fake_trace_count(void) {
    std::lock_guard<std::mutex> lock(mutex);
    return int(trace_lines.size());
}

EXPORT const char* fake_trace_line(int i) {
    std::lock_guard<std::mutex> lock(mutex);
    return trace_lines.at(size_t(i)).c_str();
}

EXPORT int fake_last_access_count(void) {
    return int(last_accesses.size());
}

EXPORT void fake_last_access(int i, const void** ptr, size_t* bytes, int* is_write) {
    const Access& a = last_accesses.at(size_t(i));
    *ptr = a.ptr, *bytes = a.bytes, *is_write = a.is_write;
}

EXPORT void* fake_last_stream(void) {
    return last_stream;
}

EXPORT int ncsim_check_range(const void* ptr, size_t bytes, int is_write, const char* what) {
    auto p = reinterpret_cast<uintptr_t>(ptr);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = allocations.upper_bound(p);
    if (it != allocations.begin()) {
        --it;
        if (p >= it->first && p + bytes <= it->first + it->second) return 0;
    }
    violations++;
    fprintf(stderr, "fake ncsim: %s %s of %zu bytes at %p is outside every allocation\n", what,
            is_write ? "write" : "read", bytes, ptr);
    return 1;
}

EXPORT void ncsim_declare_access(const void* ptr, size_t bytes, int is_write) {
    std::lock_guard<std::mutex> lock(mutex);
    declared.push_back({ptr, bytes, is_write});
}

EXPORT int ncsim_enqueue(void* stream, void (*fn)(void*), void* ctx, const char* what) {
    (void)what;
    std::lock_guard<std::mutex> lock(mutex);
    last_accesses = declared;
    declared.clear();
    if (stream == FAKE_BAD_STREAM) return 400;
    last_stream = stream;
    queue.push_back({fn, ctx});
    return 0;
}

EXPORT void ncsim_trace(const char* kind, const char* detail) {
    std::lock_guard<std::mutex> lock(mutex);
    trace_lines.push_back(std::string(kind) + ": " + detail);
}

EXPORT int ncsim_current_device(void) {
    return 0;
}
