#!/usr/bin/env bash
# Builds LazyFS (power-loss testing, issue 12) from the vendored sources, with no network:
# the exact recipe of shared/vendor/README.md. Usage: build.sh VENDOR_DIR OUT_DIR
# Leaves OUT_DIR/lazyfs-a47a5ba/lazyfs/build/lazyfs (linked against
# OUT_DIR/lazyfs-a47a5ba/libs/libpcache/build/libpcache.so) and writes OUT_DIR/ok last, so a
# build cut short is never taken for a finished one. The test harness calls it under a lock.
set -euo pipefail
vendor=$(cd "$1" && pwd)
out=$2
for tool in g++ cmake make tar patch; do
    command -v "$tool" >/dev/null 2>&1 || { echo "LazyFS build: '$tool' is missing (apt-get install g++ cmake libfuse3-dev fuse3)" >&2; exit 1; }
done
[ -e /usr/include/fuse3/fuse.h ] || { echo "LazyFS build: libfuse3-dev is missing (apt-get install libfuse3-dev)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
tar xzf "$vendor/lazyfs-a47a5ba.tar.gz" -C "$out"
tar xzf "$vendor/toml11-3.7.1.tar.gz" -C "$out"
tar xzf "$vendor/spdlog-1.10.0.tar.gz" -C "$out"
(cd "$out/lazyfs-a47a5ba" && patch -p1 <"$vendor/lazyfs-statfs.patch")
cd "$out/lazyfs-a47a5ba/libs/libpcache"
mkdir -p build/_deps
cp -r "$out/toml11-3.7.1" build/_deps/toml-src
cp -r "$out/spdlog-1.10.0" build/_deps/spdlog-src
(cd build && cmake -DFETCHCONTENT_FULLY_DISCONNECTED=ON .. && cmake --build . -j2)
cd ../../lazyfs
mkdir -p build
(cd build && cmake -DLAZYFS_BUILD_TESTS=OFF .. && cmake --build . -j2)
test -x build/lazyfs
touch "$out/ok"
