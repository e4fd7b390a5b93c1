"""What knows about the ecosystem around transformers: ``optimize()`` for live transformers
models, the outputs' transformers-compatible twins. Nothing here is imported by
``import distilbert_fast``; each module imports its library when it is itself imported."""
