// The CPU kernels compiled for the build's baseline instruction set (see kernels.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels.h"

#define STVIT_CPU_ISA isa_default
#define STVIT_CPU_TABLE kernels_default
#include "kernels_impl.h"
