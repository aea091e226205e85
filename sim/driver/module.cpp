// Modules: cuModuleLoadData takes the checked-in PTX text (kernels-ptx/ptx/*.ptx). From it the driver reads the
// first-line source stamp ("// nc-source-fnv1a64: <hash>", the FNV-1a 64 of the .cu), and for every .entry its
// name, its .param list (bytes and alignment of each), its .maxntid and the static .shared bytes it declares
// (inside its body, plus the module-scope .shared, which any entry may use). Each entry is bound to the kernel
// compiled from the same .cu for the emulator (kernel_registry.h). A PTX is refused when its stamp differs from
// the hash of the source the emulated kernels were compiled from (so the two can never drift), when one of its
// entries has no emulated kernel, or when an entry's parameter sizes differ from the C++ kernel's.
#include "state.h"
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace sim {

struct RegisteredModule {
    std::string name;
    uint64_t source_hash;
    std::vector<RegisteredKernel> kernels;
};

static std::vector<RegisteredModule>& registry() {
    static std::vector<RegisteredModule> modules;
    return modules;
}

bool register_module(const char* name, uint64_t source_hash, std::vector<RegisteredKernel> kernels,
                     const char* (*current_kernel)()) {
    registry().push_back(RegisteredModule{name, source_hash, std::move(kernels)});
    set_kernel_name_source(current_kernel);
    return true;
}

static const RegisteredKernel* find_kernel(const std::string& entry, const RegisteredModule** module) {
    for (const RegisteredModule& m : registry())
        for (const RegisteredKernel& k : m.kernels)
            if (entry == k.name) {
                *module = &m;
                return &k;
            }
    return nullptr;
}

// ---- PTX parsing -------------------------------------------------------------------------------------------------
static std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t\r"), b = s.find_last_not_of(" \t\r");
    return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

static size_t type_bytes(const std::string& t) {
    if (t == ".u8" || t == ".s8" || t == ".b8") return 1;
    if (t == ".u16" || t == ".s16" || t == ".b16" || t == ".f16" || t == ".bf16") return 2;
    if (t == ".u32" || t == ".s32" || t == ".b32" || t == ".f32") return 4;
    if (t == ".u64" || t == ".s64" || t == ".b64" || t == ".f64") return 8;
    return 0;
}

// A declaration such as ".param .align 8 .b8 name[1024]" or ".shared .align 4 .b8 x[128];" or ".param .u64 p":
// bytes and alignment, false when it cannot be read.
static bool declaration(const std::string& line, size_t& bytes, size_t& align) {
    std::istringstream in(line);
    std::string word, type, name;
    align = 0;
    in >> word;  // .param / .shared
    while (in >> word) {
        if (word == ".align") {
            in >> align;
        } else if (type_bytes(word)) {
            type = word;
            in >> name;
            break;
        }
    }
    if (type.empty()) return false;
    size_t elem = type_bytes(type), count = 1;
    if (size_t open = name.find('['); open != std::string::npos) count = std::strtoull(name.c_str() + open + 1, nullptr, 10);
    bytes = elem * count;
    if (align == 0) align = elem;
    return bytes > 0;
}

struct ParsedPtx {
    bool has_stamp = false;
    uint64_t stamp = 0;
    std::vector<FunctionInfo> entries;
};

static CUresult parse_ptx(const char* text, ParsedPtx& out) {
    std::istringstream in(text);
    std::string raw;
    bool first = true;
    size_t module_shared = 0;
    enum { Outside, Params, Header, Body } state = Outside;
    int depth = 0;
    while (std::getline(in, raw)) {
        std::string line = trim(raw);
        if (first) {
            first = false;
            const char* key = "// nc-source-fnv1a64: ";
            if (line.rfind(key, 0) == 0) {
                out.has_stamp = true;
                out.stamp = std::strtoull(line.c_str() + std::strlen(key), nullptr, 16);
            }
        }
        if (state == Outside) {
            size_t at = line.find(".entry ");
            if (at != std::string::npos && line.rfind("//", 0) != 0) {
                FunctionInfo f;
                size_t open = line.find('(', at);
                f.name = trim(line.substr(at + 7, open == std::string::npos ? std::string::npos : open - at - 7));
                out.entries.push_back(f);
                state = open != std::string::npos && line.find(')', open) != std::string::npos ? Header : Params;
            } else if (line.rfind(".shared", 0) == 0) {
                size_t bytes, align;
                if (declaration(line, bytes, align)) module_shared += bytes;
            }
        } else if (state == Params) {
            if (line.rfind(".param", 0) == 0) {
                PtxParam p;
                if (!declaration(line, p.size, p.align))
                    return fail(CUDA_ERROR_INVALID_PTX, "cuModuleLoadData: cannot read the parameter '%s' of entry %s",
                                line.c_str(), out.entries.back().name.c_str());
                out.entries.back().params.push_back(p);
            }
            if (line.find(')') != std::string::npos) state = Header;
        } else if (state == Header) {
            if (line.rfind(".maxntid", 0) == 0 || line.rfind(".reqntid", 0) == 0) {
                unsigned x = 1, y = 1, z = 1;
                std::sscanf(line.c_str() + 8, " %u , %u , %u", &x, &y, &z);
                out.entries.back().maxntid = x * y * z;
            } else if (line.rfind("{", 0) == 0) {
                state = Body;
                depth = 1;
            }
        } else {
            if (line.rfind(".shared", 0) == 0) {
                size_t bytes, align;
                if (declaration(line, bytes, align)) out.entries.back().static_shared += bytes;
            }
            for (char c : line) depth += c == '{' ? 1 : c == '}' ? -1 : 0;
            if (depth == 0) state = Outside;
        }
    }
    for (FunctionInfo& f : out.entries) f.static_shared += module_shared;
    if (out.entries.empty()) return fail(CUDA_ERROR_INVALID_PTX, "cuModuleLoadData: the PTX declares no .entry");
    return CUDA_SUCCESS;
}

// Binds each entry to its emulated kernel; refuses a stale stamp, a missing kernel, or parameter sizes that differ.
static CUresult bind(ParsedPtx& ptx, std::string& module_name) {
    const RegisteredModule* module = nullptr;
    if (!find_kernel(ptx.entries[0].name, &module))
        return fail(CUDA_ERROR_NO_BINARY_FOR_GPU,
                    "cuModuleLoadData: entry %s has no emulated kernel: the simulator runs only the kernels of "
                    "kernels-ptx/cuda that scripts/sim.sh compiled (the P2P ring's are not emulated)",
                    ptx.entries[0].name.c_str());
    module_name = module->name;
    if (!ptx.has_stamp)
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: the PTX of module '%s' has no '// nc-source-fnv1a64:' first line, so it cannot "
                    "be matched to the emulated source; regenerate it with kernels-ptx/build_ptx.sh",
                    module->name.c_str());
    if (ptx.stamp != module->source_hash)
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: the PTX of module '%s' was generated from a source with hash %016llx, but the "
                    "emulated kernels were compiled from kernels-ptx/cuda/%s.cu with hash %016llx: the PTX and the "
                    "source disagree; regenerate the PTX (kernels-ptx/build_ptx.sh) or rebuild the simulator "
                    "(scripts/sim.sh --build)",
                    module->name.c_str(), (unsigned long long)ptx.stamp, module->name.c_str(),
                    (unsigned long long)module->source_hash);
    for (FunctionInfo& f : ptx.entries) {
        const RegisteredModule* m = nullptr;
        f.kernel = find_kernel(f.name, &m);
        if (!f.kernel || m != module)
            return fail(CUDA_ERROR_NO_BINARY_FOR_GPU, "cuModuleLoadData: entry %s of module '%s' has no emulated kernel",
                        f.name.c_str(), module->name.c_str());
        if (f.kernel->params.size() != f.params.size())
            return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: entry %s has %zu parameters in the PTX, %zu in the "
                        "emulated source", f.name.c_str(), f.params.size(), f.kernel->params.size());
        for (size_t i = 0; i < f.params.size(); i++)
            if (f.kernel->params[i].size != f.params[i].size)
                return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: entry %s parameter %zu is %zu bytes in the PTX, "
                            "%zu in the emulated source", f.name.c_str(), i, f.params[i].size, f.kernel->params[i].size);
        f.max_dynamic_shared = kSharedPerBlock - std::min(kSharedPerBlock, f.static_shared);
    }
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

SIM_API CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    SimContext* ctx = nullptr;
    if (CUresult r = need_context("cuModuleLoadData", &ctx)) return r;
    const char* text = static_cast<const char*>(image);
    if (std::strncmp(text, "\x7f" "ELF", 4) == 0 || std::strstr(text, ".version") == nullptr)
        return unsupported("cuModuleLoadData", "the image is not PTX text (cubin and fatbin images are not simulated)");
    ParsedPtx ptx;
    if (CUresult r = parse_ptx(text, ptx)) return r;
    auto module = std::make_unique<SimModule>();
    if (CUresult r = bind(ptx, module->name)) return r;
    module->ctx = ctx;
    for (FunctionInfo& f : ptx.entries) {
        auto fn = std::make_unique<SimFunction>();
        fn->info = std::move(f);
        fn->module = module.get();
        module->functions.push_back(std::move(fn));
    }
    trace("module", module->name);
    *out = module.release();
    return CUDA_SUCCESS;
}

// JIT options change nothing here (there is no JIT); the image is what counts.
SIM_API CUresult cuModuleLoadDataEx(CUmodule* out, const void* image, unsigned, void*, void**) {
    return cuModuleLoadData(out, image);
}

SIM_API CUresult cuModuleUnload(CUmodule m) {
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    // Launches already queued keep what they need (the kernel binding is static, the arguments copied).
    delete m;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuModuleGetFunction(CUfunction* out, CUmodule m, const char* name) {
    if (!out || !m || !name) return CUDA_ERROR_INVALID_VALUE;
    for (auto& f : m->functions)
        if (f->info.name == name) {
            *out = f.get();
            return CUDA_SUCCESS;
        }
    return fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction: module '%s' has no entry %s", m->name.c_str(), name);
}

SIM_API CUresult cuFuncGetAttribute(int* value, int attribute, CUfunction f) {
    if (!value || !f) return CUDA_ERROR_INVALID_VALUE;
    const FunctionInfo& i = f->info;
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = int(i.maxntid ? i.maxntid : kMaxThreadsPerBlock); break;
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *value = int(i.static_shared); break;
        case CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES: *value = 0; break;
        case CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: *value = 0; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *value = 90; break;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *value = 90; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = int(i.max_dynamic_shared); break;
        default:
            return unsupported("cuFuncGetAttribute", "attribute %d of %s (register counts and the like are not "
                               "simulated)", attribute, i.name.c_str());
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    FunctionInfo& i = f->info;
    if (attribute == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (value < 0 || size_t(value) + i.static_shared > kSharedPerBlockOptin)
            return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: %s: %d bytes of dynamic shared memory plus %zu "
                        "static exceed the %zu a block may opt in to", i.name.c_str(), value, i.static_shared,
                        kSharedPerBlockOptin);
        i.max_dynamic_shared = size_t(value);
        return CUDA_SUCCESS;
    }
    if (attribute == CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT) return CUDA_SUCCESS;  // a hint
    return unsupported("cuFuncSetAttribute", "attribute %d = %d on %s", attribute, value, i.name.c_str());
}

// Cache configuration is a hint the driver may ignore; so does the simulator.
SIM_API CUresult cuFuncSetCacheConfig(CUfunction f, int) { return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
