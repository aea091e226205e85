// Prints the FNV-1a 64 hash of the files' bytes, one after the other, as 16 hex digits: the source stamp
// build_ptx.sh writes on line 1 of each PTX (a .cu followed by the headers it includes). scripts/sim.sh
// compiles it into every emulated module, and the driver compares the two.
#include <cstdint>
#include <cstdio>

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: fnv1a FILE...\n");
        return 2;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 1; i < argc; i++) {
        FILE* f = std::fopen(argv[i], "rb");
        if (!f) {
            std::perror(argv[i]);
            return 1;
        }
        for (int c; (c = std::fgetc(f)) != EOF;) h = (h ^ uint64_t(uint8_t(c))) * 0x100000001b3ull;
        std::fclose(f);
    }
    std::printf("%016llx\n", (unsigned long long)h);
    return 0;
}
