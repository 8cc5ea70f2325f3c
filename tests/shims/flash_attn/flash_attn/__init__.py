"""TEST-ONLY stand-in for the flash-attn 2.x package, so that the flash_attention_2 code paths of
transformers 5.24 and distsft run on a CPU in CI. It is NOT flash-attn and is never installed: the tests
put its parent directory (tests/shims/flash_attn) on PYTHONPATH.

What it keeps of the real package (flash_attn_interface.py / csrc/flash_attn/flash_api.cpp, v2.8):
  * the public functions transformers imports: flash_attn_func, flash_attn_varlen_func,
    flash_attn_with_kvcache, bert_padding.pad_input / unpad_input, with the real signatures (transformers
    reads them with inspect.signature to decide which keyword arguments to pass);
  * the input contract the CUDA kernels enforce, with their messages: fp16/bf16 only and one dtype for
    q/k/v, int32 contiguous cu_seqlens of length batch+1, head dim <= 256, heads of q a multiple of the
    heads of k/v (GQA), contiguous last dimension, no dropout with softcap. It also refuses what the real
    kernel would silently get wrong: cu_seqlens not starting at 0, decreasing, not ending at the token
    count, or a max_seqlen below the longest sequence;
  * the semantics: causal masks aligned to the bottom-right corner, window_size=(left, right) inclusive
    with -1 for unbounded, softcap applied as softcap*tanh(scores/softcap) after the softmax scale, rows
    with no visible key give 0.
What differs: it runs on any device, computes exact attention in fp32 with torch (so it is slow and
O(L^2) in memory) and returns the inputs' dtype; flash_attn_with_kvcache (paged decoding) is not
implemented and says so.
"""

from .interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

__version__ = "2.8.3"
IS_DISTSFT_TEST_STANDIN = True

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]
