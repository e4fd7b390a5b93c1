// bias + activation for __nv_bfloat16 (one file per dtype so builds parallelise).
#include "bias_act.cuh"

DBF_INSTANTIATE_BIAS_ACT(__nv_bfloat16)
