"""The functions a rewritten graph calls: forward unchanged, weight gradient skippable.

One module per concern: :mod:`~ldbfx.ops.path` (which path, shared helpers),
:mod:`~ldbfx.ops.rows` (ChannelDropBack's row selections), :mod:`~ldbfx.ops.kernels` (the custom
ops that read the mask when the backward runs; :mod:`~ldbfx.ops.native` builds C++ bodies for the
most frequent ones), :mod:`~ldbfx.ops.linears`,
:mod:`~ldbfx.ops.convs`, :mod:`~ldbfx.ops.embeddings`, :mod:`~ldbfx.ops.gating` (gated
parameters, BatchNorm, generic leaf modules) and :mod:`~ldbfx.ops.attention`.

The drop decision lives in a CPU bool tensor ``mask`` (one entry per layer, ``True`` = dropped) that
:func:`ldbfx.set_dropped` mutates in place. Two paths read it:

* **Eager**: each function reads ``mask[index]`` (a CPU read, no device sync) and runs the plain
  op, with the layer's parameters *detached* when it is dropped. Autograd then computes exactly
  what it computes for a frozen parameter (``requires_grad=False``): no weight gradient, no saved
  activation that only the weight gradient needs, and an output that needs no gradient when
  nothing else feeding the layer does. It is the ideal of toggling ``requires_grad``, per call,
  without touching the parameter. Kept layers run the untouched op, so all gradients are bitwise
  those of the original model with the dropped layers' parameters frozen (same kernels, same
  arguments). In dense mode (DDP) the dropped layers' parameters also get zero gradients.
* **Compiled** (``torch.compiler.is_compiling()``): the tracer must not specialise on the mask
  (it would recompile whenever the mask changes), so the op runs inside an autograd Function
  whose backward computes the input gradient with ordinary aten ops in the graph and the weight
  gradient in an opaque kernel of :mod:`ldbfx.ops.kernels` (registered with ``torch.library``)
  that reads the mask when the compiled backward *runs*. An
  identity function on the parameter would not do: the consuming op would still compute ``dW``
  (measured: ResNet-50 31.9 GFLOP either way), so the Function owns the layer's whole backward.
  A dropped layer yields a zero gradient there, which the optimizer hook of :mod:`ldbfx.runtime.mask`
  turns back into ``None`` before ``optimizer.step()``.

Every function falls back to the plain op when no gradient is needed (``no_grad``, frozen
inputs), so inference costs nothing extra and the mask changes nothing there.
"""

from .attention import multi_head_attention, routed_call
from .branch import branch, branch_start
from .convs import conv
from .embeddings import embedding
from .gating import batch_norm, masked_param, module_call
from .linears import addmm, linear, matmul
from .outputs import reachable
from .path import compiled_path, opaque_path
from .rows import row_selection, rows_in_use

__all__ = [
    "compiled_path", "opaque_path", "linear", "conv", "matmul", "addmm", "embedding", "masked_param", "batch_norm",
    "module_call", "multi_head_attention", "routed_call", "row_selection", "rows_in_use", "branch",
    "branch_start", "reachable",
]

# The rewritten graph's code names these functions by module: keep them ``ldbfx.ops.<name>``
# (``gm.code`` reads ``ldbfx_ops_conv(...)``), wherever they are defined.
for _fn in (linear, conv, matmul, addmm, embedding, masked_param, batch_norm, module_call, multi_head_attention,
            routed_call, branch, branch_start, reachable):
    _fn.__module__ = __name__
del _fn
