// Names that differ between the torch versions convrec._C builds against (torch >= 2.10, see
// EXTENSION_MIN_TORCH in setup.py). Each shim is chosen by what the headers define, not by a
// version number, so a torch that adds or renames something fails here in one place.
#pragma once

#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/shim_utils.h>

// Throws when a stable-ABI C call returns an error code. torch 2.13 added
// STABLE_TORCH_ERROR_CODE_CHECK, which also carries the C++ error message across the C boundary;
// torch 2.10-2.12 have only the header-only TORCH_ERROR_CODE_CHECK (file and line, no message).
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define CONVREC_ERROR_CODE_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#elif defined(TORCH_ERROR_CODE_CHECK)
#define CONVREC_ERROR_CODE_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#else
#error "convrec: no checking macro for stable-ABI error codes in these torch headers"
#endif
