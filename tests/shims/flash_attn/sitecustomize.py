"""TEST-ONLY: with this directory on PYTHONPATH, `import flash_attn` finds the CPU stand-in next to this
file, and transformers may dispatch flash_attention_2 to it without CUDA (flash_attn_cpu_dispatch)."""
import flash_attn_cpu_dispatch

flash_attn_cpu_dispatch.install()
