"""LoRA files in their own formats: the safetensors container, key names and module grouping, scales
and their conventions, layout detection, encoding and writing. Knows nothing of SVD."""
