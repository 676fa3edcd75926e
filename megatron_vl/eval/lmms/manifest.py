"""The ``vlgpt`` model's entry in lmms-eval's model registry (setup.py's ``lmms_eval.models``
entry point). lmms-eval loads it on every ``import lmms_eval.models``, for any model it runs,
so it imports nothing heavy: the class itself (model.py, torch and all) is imported only when
``--model vlgpt`` is asked for."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vlgpt", simple_class_path="megatron_vl.eval.lmms.model.VLGPTLmms")
