// NC_SIM_TRACE=FILE: one line per device event, tab-separated: a running number, the kind ("launch", "gemm",
// "h2d", "d2h", "d2d", "memset", "sync", "alloc", "free", "module") and a detail (kernel name and launch shape,
// GEMM shape, bytes, what synchronized); then, when the process exits, totals per kind and detail under a line
// "# totals". A step of a training run is the stretch between two host synchronizations that read back the
// loss: scripts/sim_trace_summary.sh cuts the log there.
#include "state.h"
#include <cstdio>
#include <cstdlib>

namespace sim {

struct Total {
    uint64_t count = 0, bytes = 0;
};

static std::mutex g_trace;
static FILE* g_file = nullptr;
static bool g_opened = false;
static uint64_t g_events = 0;
static std::map<std::string, Total> g_totals;

static void write_totals() {
    std::lock_guard<std::mutex> lock(g_trace);
    if (!g_file) return;
    std::fprintf(g_file, "# totals: kind\tdetail\tcount\tbytes\n");
    for (auto& [key, t] : g_totals)
        std::fprintf(g_file, "# %s\t%llu\t%llu\n", key.c_str(), (unsigned long long)t.count, (unsigned long long)t.bytes);
    std::fclose(g_file);
    g_file = nullptr;
}

void trace(const char* kind, const std::string& detail, uint64_t bytes) {
    if (config().trace_path.empty()) return;
    std::lock_guard<std::mutex> lock(g_trace);
    if (!g_opened) {
        g_opened = true;
        g_file = std::fopen(config().trace_path.c_str(), "w");
        if (!g_file) {
            say("NC_SIM_TRACE=%s cannot be written; no trace is kept (give a writable file path)",
                config().trace_path.c_str());
            return;
        }
        std::atexit(write_totals);
    }
    if (!g_file) return;
    std::fprintf(g_file, "%llu\t%s\t%s\n", (unsigned long long)++g_events, kind, detail.c_str());
    // Totals group launches by kernel name (the first word of the detail), everything else by kind and detail.
    bool by_name = std::string(kind) == "launch";
    std::string key = std::string(kind) + "\t" + (by_name ? detail.substr(0, detail.find(' ')) : detail);
    Total& t = g_totals[key];
    t.count++;
    t.bytes += bytes;
}

}  // namespace sim
