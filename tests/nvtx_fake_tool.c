/* A stand-in for a profiler's NVTX tool (what nsys names in NVTX_INJECTION64_PATH), for
 * tests/tests/nvtx_ranges.rs: it takes nvtxRangePushA, nvtxRangePop and nvtxNameCuStreamA through NVTX's
 * injection protocol (the tool fills the client's function-pointer slots) and writes each call as a line of
 * the file named by NC_FAKE_NVTX_LOG: "push NAME", "pop", "stream NAME". The ids below are NVTX's ABI
 * (nvtxDetail/nvtxTypes.h), written out here so this file needs no NVTX headers. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*fn_ptr)(void);
typedef fn_ptr **fn_table;
typedef struct {
  size_t struct_size;
  int (*get_module_function_table)(int module, fn_table *out_table, unsigned int *out_size);
} callbacks_table;
typedef struct {
  size_t struct_size;
  uint32_t version;
  uint32_t reserved0;
  void (*set_injection_nvtx_version)(uint32_t);
} version_table;
typedef const void *(*get_export_table_fn)(uint32_t id);

enum { ETID_CALLBACKS = 1, ETID_VERSIONINFO = 3 };
enum { MODULE_CORE = 1, MODULE_CUDA = 2 };
enum { CORE_RANGE_PUSH_A = 9, CORE_RANGE_POP = 11, CUDA_NAME_CU_STREAM_A = 5 };

static FILE *log_file;

static int push_a(const char *name) {
  fprintf(log_file, "push %s\n", name);
  fflush(log_file);
  return 0;
}
static int pop(void) {
  fprintf(log_file, "pop\n");
  fflush(log_file);
  return 0;
}
static void name_cu_stream_a(void *stream, const char *name) {
  (void)stream;
  fprintf(log_file, "stream %s\n", name);
  fflush(log_file);
}

#ifdef __cplusplus
extern "C"
#endif
    __attribute__((visibility("default"))) int
    InitializeInjectionNvtx2(get_export_table_fn get_export_table) {
  const char *path = getenv("NC_FAKE_NVTX_LOG");
  const version_table *v = (const version_table *)get_export_table(ETID_VERSIONINFO);
  const callbacks_table *c = (const callbacks_table *)get_export_table(ETID_CALLBACKS);
  fn_table core = 0, cuda = 0;
  unsigned int core_size = 0, cuda_size = 0;
  if (!path || !v || v->struct_size < sizeof(*v) || v->version < 2 || !c || c->struct_size < sizeof(*c))
    return 0;
  if (!c->get_module_function_table(MODULE_CORE, &core, &core_size) || core_size < CORE_RANGE_POP)
    return 0;
  if (!c->get_module_function_table(MODULE_CUDA, &cuda, &cuda_size) || cuda_size < CUDA_NAME_CU_STREAM_A)
    return 0;
  log_file = fopen(path, "w");
  if (!log_file)
    return 0;
  *core[CORE_RANGE_PUSH_A] = (fn_ptr)push_a;
  *core[CORE_RANGE_POP] = (fn_ptr)pop;
  *cuda[CUDA_NAME_CU_STREAM_A] = (fn_ptr)name_cu_stream_a;
  fprintf(log_file, "init %u %u\n", core_size, cuda_size);
  fflush(log_file);
  return 1;
}
