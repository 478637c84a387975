"""Writing a model for other runtimes: GGUF for llama.cpp and an ollama Modelfile.

May import: minillm.model, minillm.data, minillm.files, minillm.device.
"""
