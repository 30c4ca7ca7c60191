"""buildllm: the GPT that *Build a Large Language Model from Scratch* teaches, line by line.

Each module holds one idea of the book, in the order the chapters teach them: tokenizer →
data → attention → model → optim → generate → train → hf → cli, with backprop (Appendix A)
beside model.
"""

__version__ = "0.1.0"

