// masked attention forward for __nv_bfloat16 (one file per dtype and pass so builds parallelise).
#include "attention.cuh"

DBF_INSTANTIATE_ATTENTION_FORWARD(__nv_bfloat16)
