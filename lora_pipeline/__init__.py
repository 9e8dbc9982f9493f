"""lora_pipeline: the project's own tooling beside the library (`lora_ops`) and the pipeline steps (`steps`).

`lora_pipeline.devstack` starts the local stack's servers (SeaweedFS, MLflow) for `make up`, the demo and
the tests.
"""
