"""Using a trained model: generation (KV cache, sampling), chat sessions and streaming text, continuous
batching, and the OpenAI-compatible HTTP server.

May import: minillm.model, minillm.data, minillm.files, minillm.device.
"""
