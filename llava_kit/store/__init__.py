"""What llava-kit writes to disk and reads back: run directories, merged models, spec files, and checkpoints made
elsewhere (llava-hf, original LLaVA).

- `specs.py`            the typed spec files (projector.json, llava_kit_text.json, ...), each with a version
- `projector_files.py`  a projector's weights + spec, and the provenance check that refuses another base
- `run_dir.py`          what a run directory holds; writing it at the end of a run, rebuilding the model from it
- `merged.py`           merged (standalone) directories: the composite as a transformers model, merged text runs
- `foreign.py`          llava-hf and original LLaVA checkpoints opened as llava-kit models

`llava_kit.loader.open_model_dir` is the one entry point that recognises a directory and calls these.
"""
