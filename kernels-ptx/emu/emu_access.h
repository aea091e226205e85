// The range an access check passed (emu_race.h's pass cache): [lo, hi), every access inside which would pass
// too. Its own header because the simulated driver's check (sim/driver/memory.cpp), built without the
// emulator, fills it.
#pragma once
#include <cstdint>

struct EmuAccessPassed {
    uintptr_t lo = 0, hi = 0;
};
