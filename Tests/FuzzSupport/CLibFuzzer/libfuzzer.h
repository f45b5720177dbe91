// libFuzzer's driver entry point (compiler-rt, FuzzerInterface.h / FuzzerDriver.cpp), for a
// program that has a main of its own: SwiftPM links every executable with
// `--defsym main=<Module>_main`, so the DflockdFuzz target defines DflockdFuzz_main and hands
// the command line to this driver. Defined by the fuzzer runtime that -sanitize=fuzzer links.
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*UserCb)(const uint8_t *Data, size_t Size));
