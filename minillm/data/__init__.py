"""Text to training examples: JSON lines with file:line errors, the BPE tokenizer and its chat template (the
only place control tokens are inserted, with the loss mask), datasets (text, chat, preference pairs), the
packed and sharded token caches.

May import: minillm.files and minillm.device. Knows nothing of the model's insides, training or serving.
"""
