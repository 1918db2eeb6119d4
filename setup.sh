#!/bin/sh
# Sets up a Debian 12 machine for qsnap, builds it, and runs one job:
#   ./setup.sh demo   build, then run the demo on a small image it makes
#   ./setup.sh test   build with -Werror, then run the whole test suite
#   ./setup.sh build  build only
# Must run as root (it installs packages with apt-get) unless everything
# is installed already.  The build goes to ./build.
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
qemu-utils qemu-system-x86 e2fsprogs valgrind"

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

case $job in
demo)
    make demo
    ;;
test)
    if ! make -j"$(nproc)" check; then
        cat test-suite.log
        exit 1
    fi
    ;;
esac
