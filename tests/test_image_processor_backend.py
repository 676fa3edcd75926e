"""The CLIP image processor our image tokenizer loads is transformers' PIL class by name, so its
pixels do not depend on whether torchvision is installed. With torchvision importable,
transformers' AutoImageProcessor picks the torchvision backend instead, whose resizing gives
slightly different pixels (lmms-eval's install brings torchvision along): the reason for the pin.

Each environment runs the branch it can; the other is skipped with the reason. The torchvision
branch was run once in a venv with torch 2.14.1 + torchvision 0.29.1 (README)."""

import importlib
import importlib.util

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", None)
pytestmark = pytest.mark.skipif(
    CLIPImageProcessorPil is None,
    reason="transformers < 5 has no CLIPImageProcessorPil (its CLIPImageProcessor is the PIL one)")

SIZE = 32   # the tiny CLIP's input size (testing.tiny_models.save_tiny_clip)


def _torchvision_imports() -> bool:
    # PyPI's CUDA torchvision beside CPU torch is installed but raises on import (RuntimeError);
    # transformers then still believes it available, so "importable" is asked of the import itself.
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    """A preprocessor_config.json as our tiny CLIP saves it (the model's weights are not needed)."""
    d = tmp_path_factory.mktemp("clip")
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def images():
    """Images that must be resized (down and up) and cropped: where the backends part ways."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(48, 64), (37, 53), (SIZE, SIZE), (300, 200), (20, 27)]]


def _pixels(processor, images):
    return processor(images=images, return_tensors="np")["pixel_values"]


def test_our_loader_is_the_pil_class_with_or_without_torchvision(processor_dir, images):
    from megatron_vl.model.image_tokenizer import load_image_processor
    ours = load_image_processor(processor_dir)
    assert type(ours) is CLIPImageProcessorPil
    expected = _pixels(CLIPImageProcessorPil.from_pretrained(processor_dir), images)
    got = _pixels(ours, images)
    assert got.shape == (len(images), 3, SIZE, SIZE)
    assert np.array_equal(got, expected)


def test_with_torchvision_auto_image_processor_would_differ(processor_dir, images):
    if not _torchvision_imports():
        pytest.skip("torchvision does not import here, so transformers' torchvision backend cannot be built: "
                    "the case the pin guards against is checked where torchvision imports")
    auto = transformers.AutoImageProcessor.from_pretrained(processor_dir)
    assert type(auto) is not CLIPImageProcessorPil, type(auto)
    assert type(auto).__name__ == "CLIPImageProcessor"
    ours, theirs = _pixels(CLIPImageProcessorPil.from_pretrained(processor_dir), images), _pixels(auto, images)
    assert ours.shape == theirs.shape
    gap = np.abs(ours - theirs).max()
    # Slightly, not wholly: the same normalisation, a different resampling (torch's bicubic vs PIL's).
    assert 1e-3 < gap < 0.1, gap


def test_without_torchvision_auto_image_processor_is_the_pil_class_too(processor_dir, images):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: AutoImageProcessor's default is its backend (the other test)")
    auto = transformers.AutoImageProcessor.from_pretrained(processor_dir)
    assert type(auto) is CLIPImageProcessorPil
    assert np.array_equal(_pixels(auto, images), _pixels(CLIPImageProcessorPil.from_pretrained(processor_dir), images))
