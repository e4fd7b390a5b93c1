// residual + LayerNorm for __half (one file per dtype so builds parallelise).
#include "layernorm.cuh"

DBF_INSTANTIATE_LAYERNORM(__half)
