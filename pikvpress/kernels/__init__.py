"""Triton kernels, their pure-torch references beside them, and the dispatch between them.

CUDA tensors run the Triton kernel; CPU tensors run the reference; tests run each kernel under
``TRITON_INTERPRET=1`` against its reference. Each topic has three modules, as FlashInfer splits
``triton/kernels/cascade.py`` from ``triton/cascade.py``: ``<topic>.py`` (argument checks, launch
grid, dispatch), ``<topic>_triton.py`` (only Triton-language code: kernels and their device helpers,
importable without Triton) and ``<topic>_reference.py`` (pure torch). ``quantize.py`` still holds
all three for quantization.

Attention names: a *partial* is ``(out, lse)``, an attention output softmax-normalised over part of
the KV with the natural-log log-sum-exp of its scaled logits; partials merge exactly.

- ``attention_partial`` / ``packed_attention_partial``: the partial over all of dense K/V tensors /
  packed :class:`QuantizedTensor` K/V;
- ``attention_split_partials`` / ``packed_attention_split_partials``: one partial per split of the
  sequence axis (``num_splits``), ``(B, Hq, S, Dv)`` and ``(B, Hq, S)``;
- ``packed_attention`` / ``packed_attention_with_residual``: the merged output only;
- ``merge_partials``: the merge (FlashInfer's ``merge_state``);
- a ``_reference`` suffix: the pure-torch twin of the function of that name that runs a kernel.
"""

from pikvpress.kernels.attention import (
    attention_partial,
    attention_split_partials,
    choose_num_splits,
    merge_partials,
    packed_attention,
    packed_attention_partial,
    packed_attention_split_partials,
    packed_attention_split_partials_reference,
    packed_attention_with_residual,
    programs_per_split,
    split_bounds,
)
from pikvpress.kernels.quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_reference,
    quantize_keys,
    quantize_keys_reference,
    quantize_values,
    quantize_values_reference,
)

__all__ = [
    "QuantizedTensor",
    "attention_partial",
    "attention_split_partials",
    "choose_num_splits",
    "dequantize",
    "dequantize_reference",
    "merge_partials",
    "packed_attention",
    "packed_attention_partial",
    "packed_attention_split_partials",
    "packed_attention_split_partials_reference",
    "packed_attention_with_residual",
    "programs_per_split",
    "quantize_keys",
    "quantize_keys_reference",
    "quantize_values",
    "quantize_values_reference",
    "split_bounds",
]
