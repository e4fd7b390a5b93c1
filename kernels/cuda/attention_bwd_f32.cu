// masked attention backward for float (one file per dtype and pass so builds parallelise).
#include "attention.cuh"

DBF_INSTANTIATE_ATTENTION_BACKWARD(float)
