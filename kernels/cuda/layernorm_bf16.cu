// residual + LayerNorm for __nv_bfloat16 (one file per dtype so builds parallelise).
#include "layernorm.cuh"

DBF_INSTANTIATE_LAYERNORM(__nv_bfloat16)
