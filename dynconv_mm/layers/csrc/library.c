/* The native library's queries: its ABI version and whether it was built with OpenMP. */
#include "common.h"

int dcmm_abi_version(void) { return DCMM_ABI_VERSION; }

/* whether the library runs its loops on several threads (built with OpenMP) */
int dcmm_has_openmp(void) { return HAS_OPENMP; }
