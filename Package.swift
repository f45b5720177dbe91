// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "DflockdClient",
    products: [
        .library(name: "DflockdClient", targets: ["DflockdClient"]),
        .executable(name: "dflockd-bench", targets: ["DflockdBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        // `make docs`: swift package generate-documentation (a plugin; nothing of it is linked).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        // Operations (#17): the ecosystem's logging, metrics and service life cycle.
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // dflockd-bench --metrics: a real in-process metrics backend (nothing of it is in the library).
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        .systemLibrary(
            name: "CUV",
            pkgConfig: "libuv",
            providers: [.apt(["libuv1-dev"])]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(
            name: "DflockdClient",
            dependencies: [
                "CUV",
                "COpenSSL",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            // Async methods run on their caller's executor (SE-0461): an actor or task on the
            // loop's executor calls into the library without leaving the loop thread.
            swiftSettings: [.enableUpcomingFeature("NonisolatedNonsendingByDefault")]
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
        .executableTarget(
            name: "Quickstart",
            dependencies: ["DflockdClient"],
            path: "Examples/Quickstart"
        ),
        .executableTarget(
            name: "Callbacks",
            dependencies: ["DflockdClient"],
            path: "Examples/Callbacks"
        ),
        .executableTarget(
            name: "TwoPhase",
            dependencies: ["DflockdClient"],
            path: "Examples/TwoPhase"
        ),
        .executableTarget(
            name: "LockLost",
            dependencies: ["DflockdClient"],
            path: "Examples/LockLost"
        ),
        .executableTarget(
            name: "Sharding",
            dependencies: ["DflockdClient"],
            path: "Examples/Sharding"
        ),
        .executableTarget(
            name: "Semaphore",
            dependencies: ["DflockdClient"],
            path: "Examples/Semaphore"
        ),
        .executableTarget(
            name: "EmbeddedServer",
            dependencies: ["DflockdClient", "CUV"],
            path: "Examples/EmbeddedServer"
        ),
        .executableTarget(
            name: "ActorService",
            dependencies: ["DflockdClient"],
            path: "Examples/ActorService"
        ),
        .executableTarget(
            name: "Service",
            dependencies: [
                "DflockdClient",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Examples/Service"
        ),
        .executableTarget(
            name: "DflockdBench",
            dependencies: [
                "DflockdClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            path: "Benchmarks/DflockdBench"
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
            dependencies: [
                "DflockdClient", "CUV",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["Fixtures", "DocumentedReplies"],  // read through #filePath, like the transcripts
            resources: [.copy("Transcripts")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
