// Race mode for emu.h (placeholder: filled in by the next commit).
#pragma once
inline bool emu_race_enabled() { return false; }
inline uint64_t emu_race_seed() { return 1; }
inline void emu_race_launch_start(const char*) {}
inline void emu_race_block_start(EmuBlock&) {}
inline void emu_race_block_end(EmuBlock&) {}
inline void emu_race_block_barrier(EmuBlock&) {}
inline void emu_race_warp_barrier(EmuBlock&, unsigned) {}
inline void emu_race_cp_issue(EmuBlock&, EmuThread&, void*) {}
inline void emu_race_cp_complete(EmuBlock&, EmuThread&, void*) {}
