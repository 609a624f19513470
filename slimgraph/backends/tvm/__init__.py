"""Apache TVM backends: `tvm-llvm` (CPU) and `tvm-cuda`, compiled through Relax.

The artifact is `<backend>/model.so` (weights inside, loadable by the bare TVM runtime with
`tvm.runtime.load_module` + `tvm.runtime.vm.VirtualMachine`) and `<backend>/io.json` (names,
shapes, dtypes, the fixed batch if any). TVM is imported lazily, so slimgraph works without it.

``backend`` builds, ``lower`` rewrites what the Relax ONNX frontend cannot import (LSTM,
shape computations of a fixed batch), ``tuning`` runs MetaSchedule, ``runtime`` loads and runs.
"""

from slimgraph.backends.tvm.backend import TVM_CUDA, TVM_LLVM, TvmBackend, tvm_unavailable_reason
from slimgraph.backends.tvm.runtime import TensorSpec, load_runner
from slimgraph.backends.tvm.tuning import load_cpu_tensor_intrinsics

__all__ = ["TVM_CUDA", "TVM_LLVM", "TensorSpec", "TvmBackend", "load_cpu_tensor_intrinsics",
           "load_runner", "tvm_unavailable_reason"]
