"""Where the weights come from. `sources.load_model` is the one entry; each module has one job:

- tiny.py (offline toy model), synthetic.py (full size, random), config.py (the real model's component configs);
- hub.py: a hub id (online, or the local Hugging Face cache offline) or a diffusers directory, and the start-up
  message for each way it is not there (gated, missing, offline miss);
- single_file.py: `--transformer`, one file in Black Forest Labs' layout; bfl_layout.py (its keys and architecture),
  fp8_storage.py (files stored in fp8), safetensors_file.py (header checks, reads without mmap);
- host_memory.py: the peak host memory of the load.
"""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried and what to do."""
