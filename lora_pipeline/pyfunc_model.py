"""The code MLflow runs to load a registered LoRA version (models-from-code).

`mlflow.pyfunc.load_model` executes this file with the version's `code/` folder (the project's packages,
logged as source with `code_paths`) first on `sys.path`, so it imports the model class the version was
registered with: no pickled code travels through the artifact store.
"""

from mlflow.models import set_model

from lora_pipeline.serving import LoraPipelineModel

set_model(LoraPipelineModel())
