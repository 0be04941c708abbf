"""Triton kernels, their pure-torch references beside them, and the dispatch between them.

CUDA tensors run the Triton kernel; CPU tensors run the reference; tests run each kernel under
``TRITON_INTERPRET=1`` against its reference. The packed-KV kernels land with the quantization press.
"""
