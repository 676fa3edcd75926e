"""Running a trained VL-GPT: the Hugging Face class over an export (modeling_vlgpt.py), the
interleaved image-text generator (generation.py), the one interleaved decode loop they and the
in-training evaluator share (decode_loop.py) with its sampler and settings (sampling.py), the
diffusion decoder that turns generated image embeddings into pixels (diffusion_decoder.py),
and the export's file names (export_layout.py). Nothing here imports the training stack.
"""
