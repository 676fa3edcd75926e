"""Checkpoint formats on disk, and nothing else: what training, conversion, export and
generation write and read, importable without building a run.

- layout.py: tags, ``latest``, ``stage.json``, the manifest, marker names, CheckpointError
- names.py: layout-independent parameter names and how tensor parallelism cuts each tensor
- release.py: the converted (release) language-model checkpoint, Megatron's shard layout
- training_reader.py: a training checkpoint's weights and optimizer state, read lazily
  whatever TP / PP / ZeRO layout wrote it
- merged.py: those weights with LoRA adapters and trained token rows folded in
- output_dir.py: output directories that appear whole or not at all

training/ (saving and loading through the DeepSpeed engine) and convert/ (HF in and out)
import this package; it imports neither.
"""
