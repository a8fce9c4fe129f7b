// Former name of torch_to_kernel.h (with arg_errors.h), kept only because cuda/moh_cuda.cpp,
// under concurrent edits on main, still includes it: include torch_to_kernel.h instead, and
// delete this file once moh_cuda.cpp does.
#pragma once

#include "torch_to_kernel.h"
