// Messages on stderr (every one starts "nc-sim: "), and cuGetErrorName / cuGetErrorString for every code.
#include "state.h"
#include "error_codes.inc"
#include <cstdio>
#include <cstdlib>
#include <unistd.h>

namespace sim {

static void vsay(const char* prefix, const char* fmt, va_list ap) {
    char line[2048];
    int n = std::snprintf(line, sizeof line, "nc-sim: %s", prefix);
    if (n < 0) n = 0;
    std::vsnprintf(line + n, sizeof line - size_t(n), fmt, ap);
    std::fprintf(stderr, "%s\n", line);
    std::fflush(stderr);
}

void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsay("", fmt, ap);
    va_end(ap);
}

CUresult unsupported(const char* entry, const char* fmt, ...) {
    char prefix[256];
    std::snprintf(prefix, sizeof prefix, "%s is not supported by the simulated driver: ", entry);
    va_list ap;
    va_start(ap, fmt);
    vsay(prefix, fmt, ap);
    va_end(ap);
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult fail(CUresult code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsay("", fmt, ap);
    va_end(ap);
    return code;
}

void fault(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsay("DEVICE FAULT: ", fmt, ap);
    va_end(ap);
    std::fflush(nullptr);
    _exit(1);
}

}  // namespace sim

// The table of every CUresult (error_codes.inc), for both lookups.
struct ErrorCode {
    CUresult value;
    const char* name;
    const char* text;
};
#define SIM_ERROR_ROW(value, name, text) {value, name, text},
static const ErrorCode kErrorCodes[] = {SIM_ERROR_CODES(SIM_ERROR_ROW)};

// *out = the `field` of `error`'s row; CUDA_ERROR_INVALID_VALUE (and *out = NULL) for a value not in the table.
static CUresult describe(CUresult error, const char** out, const char* ErrorCode::*field) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    for (const ErrorCode& code : kErrorCodes) {
        if (code.value == error) {
            *out = code.*field;
            return CUDA_SUCCESS;
        }
    }
    *out = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

SIM_API CUresult cuGetErrorName(CUresult error, const char** out) {
    return describe(error, out, &ErrorCode::name);
}

SIM_API CUresult cuGetErrorString(CUresult error, const char** out) {
    return describe(error, out, &ErrorCode::text);
}
