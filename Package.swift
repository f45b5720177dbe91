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
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
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
        .executableTarget(
            name: "DflockdBench",
            dependencies: [
                "DflockdClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks/DflockdBench"
        ),
        .testTarget(
            name: "DflockdClientTests",
            dependencies: ["DflockdClient", "CUV"],
            resources: [.copy("Transcripts")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
