"""Measuring a model: perplexity and bits per byte, and behavioural tasks (poetry cloze, request following).

May import: minillm.infer, minillm.export, minillm.model, minillm.data, minillm.files, minillm.device.
"""
