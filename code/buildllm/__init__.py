"""buildllm: the GPT that *Build a Large Language Model from Scratch* teaches, line by line.

Each module holds one idea of the book, in the order the chapters teach them, and imports
only modules to its left: bpe → vocab_io → tokenizer → data → shards → attention →
model → evaluate → optim → profiling → generate → checkpoint → datasources →
distributed → train → hf → hf_tokenizer → cli_data → cli_train → cli_sample → cli_eval
→ cli, with backprop and backprop_model (Appendix A) beside model.
"""

__version__ = "0.1.0"
