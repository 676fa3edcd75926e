"""Lines other libraries print on our runs that a user would read as trouble, though nothing is
wrong and nothing can be done about them; each is silenced by its exact wording, nothing else.

- transformers >= 5 without torchvision: importing ``CLIPImageProcessor`` /
  ``SiglipImageProcessor`` (diffusers does, at import) falls back to the PIL class with a
  warning. The PIL class is the one we want (the same numbers with or without torchvision):
  our code names it (``clip_image_processor_class``), and the notes diffusers' imports trigger
  are dropped.
- DeepSpeed's ZeRO step calls ``torch.distributed.all_gather_into_tensor`` /
  ``reduce_scatter_tensor``, which torch >= 2.13 marks deprecated (a FutureWarning per rank);
  our own code calls neither.
- diffusers' IP-Adapter loader casts the UNet with ``.to(dtype=...)`` itself, which warns that
  "modules ... should be kept in float32: []" (an empty list: no module is affected), and
  says the image encoder is not loaded when we pass ``image_encoder_folder=None`` on purpose
  (we encode images ourselves). ``quiet_ip_adapter_load`` drops both during that call.

``quiet_third_party`` is installed when the package is imported (idempotent).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
DEPRECATED_COLLECTIVES = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
                          r"_reduce_scatter_base)` is (deprecated|a private function)")
IP_ADAPTER_NOTES = ("that should be kept in float32: []",
                    "image_encoder is not loaded since `image_encoder_folder=None`")


class DropMessages(logging.Filter):
    """Drops log records whose message contains any of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:   # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(p in message for p in self.parts)


_installed = False


def quiet_third_party() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("transformers.utils.import_utils").addFilter(DropMessages(TORCHVISION_FALLBACK))
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)


@contextlib.contextmanager
def _filtered(names, drop: logging.Filter):
    """`drop` on the loggers `names` for the block."""
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def quiet_ip_adapter_load():
    """diffusers' notes while it loads IP-Adapter weights (module docstring)."""
    return _filtered(("diffusers.models.modeling_utils", "diffusers.loaders.ip_adapter"), DropMessages(*IP_ADAPTER_NOTES))


class _RoutineLoadReport(logging.Filter):
    """Drops a LOAD REPORT of unused and missing keys only: one with size mismatches or failed
    conversions precedes transformers' error that points at it, and stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:   # noqa: BLE001
            return True
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


def quiet_load_report():
    """transformers' LOAD REPORT (keys missing from or unused in a checkpoint) while a caller
    that examines the loading info itself loads a model (directory.load_pretrained's
    ``complete``: it refuses missing weights by name; unused ones, e.g. the text tower of a full
    CLIP directory read as its vision side, are expected)."""
    return _filtered(("transformers.modeling_utils", "transformers.utils.loading_report"), _RoutineLoadReport())


def clip_image_processor_class():
    """transformers' PIL CLIP image processor: ``CLIPImageProcessorPil`` (transformers >= 5,
    where the plain name is the torchvision backend) or ``CLIPImageProcessor`` (before 5, where
    it is the PIL one). Both read and write the same preprocessor_config.json."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor
