"""Writing a model for other tools: GGUF for llama.cpp, an ollama Modelfile, the model card for the Hugging Face Hub.

May import: minillm.model, minillm.data, minillm.files, minillm.device.
"""
