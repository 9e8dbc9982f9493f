"""The code MLflow runs to load a registered LoRA version (models-from-code).

`mlflow.pyfunc.load_model` executes this file, which only imports the installed project's model class:
no pickled code travels through the artifact store.
"""

from mlflow.models import set_model

from steps.registry import LoraPipelineModel

set_model(LoraPipelineModel())
