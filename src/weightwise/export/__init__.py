"""Exporters: weightwise quantized tensors in other runtimes' storage formats, bit for bit."""
