# Cross-compiling lowbit's kernel library for Linux/AArch64 with Debian's cross toolchain
# (apt-get install g++-aarch64-linux-gnu). Binaries run under qemu-user:
#   qemu-aarch64 -L /usr/aarch64-linux-gnu <binary>
# Used by scripts/test_aarch64.sh.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(LOWBIT_CROSS_PREFIX aarch64-linux-gnu-)
set(CMAKE_C_COMPILER ${LOWBIT_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${LOWBIT_CROSS_PREFIX}g++)

# Libraries and headers come from the cross sysroot only; programs from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Lets ctest run the cross-built tests directly.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/usr/aarch64-linux-gnu)
