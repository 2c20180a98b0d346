#!/bin/sh
# Builds the Hive test guest: `build.sh OUT_DIR` writes OUT_DIR/hive-test-guest.elf and prints its
# path. gcc/as/ld only (no extra Rust target). Fails if the image contains instructions the nested
# KVM here cannot emulate (SSE, popcnt, int3, xsave, cmpxchg16b).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
mkdir -p "$out"
CC=${CC:-gcc}
CFLAGS="-m64 -march=x86-64 -O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -mno-red-zone
 -mgeneral-regs-only -mno-sse -mno-mmx -mno-80387 -fno-asynchronous-unwind-tables -fno-builtin
 -fcf-protection=none -Wall -Wextra -Werror -Wno-unused-parameter"
$CC $CFLAGS -c "$here/start.S" -o "$out/start.o"
$CC $CFLAGS -c "$here/guest.c" -o "$out/guest.o"
ld -nostdlib -static -no-pie --build-id=none -z noexecstack -z max-page-size=4096 \
   -T "$here/guest.ld" -o "$out/hive-test-guest.elf.tmp" "$out/start.o" "$out/guest.o"
if objdump -d "$out/hive-test-guest.elf.tmp" | grep -Eiw 'popcnt|int3|xsave|xrstor|cmpxchg16b|%xmm[0-9]+|%ymm[0-9]+' ; then
    echo "build.sh: guest contains instructions the nested KVM cannot emulate" >&2
    exit 1
fi
mv "$out/hive-test-guest.elf.tmp" "$out/hive-test-guest.elf"
echo "$out/hive-test-guest.elf"
