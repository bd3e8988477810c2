"""Enclave application (tokenizer) and its parent-side counterparts."""
