"""VL-GPT in lmms-eval (pip install -e .[lmms]): the model class lmms-eval knows as ``vlgpt``.

Two ways in:
- the lmms-eval CLI over an HF export: ``python -m lmms_eval --model vlgpt --model_args
  pretrained=<export dir>,... --tasks ...`` (model.VLGPTLmms over backend.ExportBackend; the
  name comes from setup.py's ``lmms_eval.models`` entry point, manifest.MANIFEST);
- during training (``--eval-harness lmms``): training.py runs lmms-eval's evaluator on a
  VLGPTLmms over the live engine (its EngineBackend), with no second copy of the weights.

Nothing here is imported by the rest of the package; lmms-eval is an optional dependency.
"""
