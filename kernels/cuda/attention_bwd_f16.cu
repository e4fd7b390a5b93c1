// masked attention backward for __half (one file per dtype and pass so builds parallelise).
#include "attention.cuh"

DBF_INSTANTIATE_ATTENTION_BACKWARD(__half)
