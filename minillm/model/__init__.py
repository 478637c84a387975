"""The model: LMConfig, the hand-written decoder (attention, RoPE, SwiGLU, KV caches), its loss, LoRA, and
the Hugging Face layouts it is saved and loaded in.

May import: minillm.files and minillm.device. Knows nothing of data, training, evaluation or serving.
"""
