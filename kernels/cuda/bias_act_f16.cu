// bias + activation for __half (one file per dtype so builds parallelise).
#include "bias_act.cuh"

DBF_INSTANTIATE_BIAS_ACT(__half)
