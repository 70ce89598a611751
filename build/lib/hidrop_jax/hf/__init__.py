"""Exchange with Hugging Face: the name/config mapping (`mapping`), import (`load`), export
(`save`), HF-style batches (`inputs`) and the PyTorch accuracy check (`torch_eval`)."""
