#!/bin/sh
# Sets up a Debian 12 machine for qsnap, builds it, and runs one job:
#   ./setup.sh demo   build, then run the demo on a small image it makes
#   ./setup.sh test   build with -Werror, run the whole test suite, the unit
#                     suites under valgrind and each fuzzer for a minute,
#                     then the whole suite again built with ASan and UBSan
#   ./setup.sh build  build only
# Must run as root (it installs packages with apt-get) unless everything
# is installed already.  The build goes to ./build (./build-san for the
# sanitizer build of the test job).
set -eu

job=${1:-demo}
case $job in
demo | test | build) ;;
*)
    echo "usage: $0 [demo|test|build]" >&2
    exit 2
    ;;
esac

top=$(cd "$(dirname "$0")" && pwd)

packages="build-essential autoconf automake libtool pkg-config \
zlib1g-dev libzstd-dev libxxhash-dev check libfuse3-dev fuse3 \
qemu-utils qemu-system-x86 e2fsprogs valgrind clang libclang-rt-14-dev"

missing=
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
        grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    echo "setup: installing:$missing"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: run as root to install packages" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
fi

cd "$top"
if [ ! -x configure ] || [ configure.ac -nt configure ] ||
    [ Makefile.am -nt configure ]; then
    autoreconf -fi
fi
mkdir -p build
cd build
if [ ! -f Makefile ] || [ ../configure -nt config.status ]; then
    ../configure --enable-werror
fi
make -j"$(nproc)"

# check_in DIR: make check in a build directory, showing the log on failure.
check_in()
{
    if ! make -C "$1" -j"$(nproc)" check; then
        cat "$1/test-suite.log"
        exit 1
    fi
}

case $job in
demo)
    make demo
    ;;
test)
    # 1. Every test on the normal build, then the unit suites under
    #    valgrind memcheck.
    check_in "$top/build"
    make check-valgrind
    # 2. Each libFuzzer harness for a minute (longer: make fuzz).
    make fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
    # 3. The whole suite again with AddressSanitizer and UBSan.
    mkdir -p "$top/build-san"
    cd "$top/build-san"
    if [ ! -f Makefile ] || [ ../configure -nt config.status ]; then
        ../configure --enable-werror --enable-sanitizers
    fi
    make -j"$(nproc)"
    check_in "$top/build-san"
    ;;
esac
