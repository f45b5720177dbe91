// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "DflockdClient",
    products: [
        .library(name: "DflockdClient", targets: ["DflockdClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CUV",
            pkgConfig: "libuv",
            providers: [.apt(["libuv1-dev"])]
        ),
        .target(
            name: "DflockdClient",
            dependencies: [
                "CUV",
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        .executableTarget(
            name: "Demo",
            dependencies: ["DflockdClient"],
            path: "Examples/Demo"
        ),
        .executableTarget(
            name: "Embedded",
            dependencies: ["DflockdClient", "CUV"],
            path: "Examples/Embedded"
        ),
        // The fuzz harness (make fuzz) and, in debug builds, a replayer of its inputs.
        .executableTarget(
            name: "DflockdFuzz",
            dependencies: ["DflockdClient", "CUV", "CLibFuzzer"],
            path: "Tests/Fuzz",
            exclude: ["make-seeds.py", "Regressions"]
        ),
        .systemLibrary(name: "CLibFuzzer", path: "Tests/FuzzSupport/CLibFuzzer"),
        .testTarget(
            name: "DflockdClientTests",
            dependencies: ["DflockdClient", "CUV"],
            resources: [.copy("Transcripts")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
