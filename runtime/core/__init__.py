"""The inference core: bundle loading, backends, KV cache, decode loop, tokenizer and template, image input and
output, the pipeline. Imports runtime.contract only."""
