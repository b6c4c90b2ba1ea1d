"""Low-precision formats and what uses them: NVFP4 and MXFP8 (`nvfp4`, `mxfp8`), the NVFP4 training recipe's
emulated GEMMs, and NVFP4 checkpoints in the TensorRT Model Optimizer layout."""
