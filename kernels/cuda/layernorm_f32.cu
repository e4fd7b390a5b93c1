// residual + LayerNorm for float (one file per dtype so builds parallelise).
#include "layernorm.cuh"

DBF_INSTANTIATE_LAYERNORM(float)
