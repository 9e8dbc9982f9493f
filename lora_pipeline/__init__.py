"""lora_pipeline: the pipeline around the library (`lora_ops`).

- `lora_pipeline.steps` (the repository's `steps/` folder): one command line program per pipeline stage,
  `python -m lora_pipeline.steps.<name>` (docs/steps.md);
- `lora_pipeline.serving`: the registered LoRA as an MLflow pyfunc model and the `lora-registry` lookup;
- `lora_pipeline.devstack`: the local stack's servers (SeaweedFS, MLflow) for `make up`, the demo and the tests.
"""
