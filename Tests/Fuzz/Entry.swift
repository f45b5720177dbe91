// Entry points of the DflockdFuzz executable.
//
// `make fuzz` builds it with -D DFLOCKD_FUZZ and -sanitize=fuzzer: the program is libFuzzer,
// calling LLVMFuzzerTestOneInput for every input. SwiftPM links an executable's `main` to
// `DflockdFuzz_main` (--defsym), which libFuzzer's own main cannot satisfy, so that function is
// defined here and runs libFuzzer's driver with the command line (libFuzzer's flags).
//
// Otherwise it is a replayer: `DflockdFuzz FILE|DIR...` runs each file (a crash input, a corpus)
// through the same harness once, to reproduce a crash in a debug build under a debugger.

#if DFLOCKD_FUZZ
import CLibFuzzer

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    FuzzHarness.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_cdecl("DflockdFuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzOneInput(data, size) }
}
#else
import Foundation

@main
struct Replay {
    static func main() {
        #if DEBUG
        var files: [String] = []
        for argument in CommandLine.arguments.dropFirst() {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: argument, isDirectory: &isDirectory) else {
                print("no such file: \(argument)")
                exit(2)
            }
            if isDirectory.boolValue {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: argument)) ?? []
                files += names.sorted().map { "\(argument)/\($0)" }
            } else {
                files.append(argument)
            }
        }
        if files.isEmpty {
            print("usage: DflockdFuzz FILE|DIR...   (fuzzing itself: make fuzz)")
            exit(2)
        }
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else { continue }
            data.withUnsafeBytes { FuzzHarness.run($0) }
        }
        print("DflockdFuzz: \(files.count) inputs ran without a crash")
        #else
        print("DflockdFuzz: this release build has no harness; use a debug build or `make fuzz`")
        exit(2)
        #endif
    }
}
#endif
