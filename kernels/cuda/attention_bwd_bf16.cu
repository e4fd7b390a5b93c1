// masked attention backward for __nv_bfloat16 (one file per dtype and pass so builds parallelise).
#include "attention.cuh"

DBF_INSTANTIATE_ATTENTION_BACKWARD(__nv_bfloat16)
