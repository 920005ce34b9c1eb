"""What the tests (and the benchmarks) share: never shipped in the package."""
